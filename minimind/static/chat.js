// The chat page of `python -m minimind.serve` (chapter 11): the conversation lives here, in `messages`;
// each turn posts all of it with stream: true and appends the streamed deltas to the reply as text.
const $ = id => document.getElementById(id);
let messages = [], controller = null;
const modelName = fetch("v1/models").then(r => r.json()).then(j => ($("model").textContent = j.data[0].id));

function bubble(role) {
  const d = document.createElement("div"), think = document.createElement("div"), content = document.createElement("div");
  d.className = "msg " + role; think.className = "think"; content.className = "content";
  d.append(think, content); $("log").append(d); $("log").scrollTop = $("log").scrollHeight;
  return d;
}

// Server-sent events: split the body on blank lines as it arrives; call onEvent with each `data:` JSON.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i); buf = buf.slice(i + 2);
      for (const line of event.split("\n"))
        if (line.startsWith("data: ") && line !== "data: [DONE]") onEvent(JSON.parse(line.slice(6)));
    }
  }
}

async function send(text) {
  messages.push({role: "user", content: text});
  bubble("user").querySelector(".content").textContent = text;
  const out = bubble("assistant"), think = out.querySelector(".think"), content = out.querySelector(".content");
  out.dataset.chunks = 0;
  document.body.dataset.state = "busy"; $("send").disabled = true; $("stop").disabled = false;
  controller = new AbortController();
  try {
    const body = {model: await modelName, messages, stream: true, temperature: +$("temperature").value,
                  top_p: +$("top_p").value, max_tokens: +$("max_tokens").value};
    const r = await fetch("v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                   body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error(j.error ? j.error.message : r.statusText); }
    await readEvents(r, j => {
      if (j.error) throw new Error(j.error.message);
      const d = (j.choices[0] || {}).delta || {};
      if (d.reasoning_content) think.textContent += d.reasoning_content;  // text, never HTML
      if (d.content) content.textContent += d.content;
      out.dataset.chunks = +out.dataset.chunks + 1;
      $("log").scrollTop = $("log").scrollHeight;
    });
  } catch (e) {
    if (e.name !== "AbortError") { const err = document.createElement("div"); err.className = "error"; err.textContent = e.message; out.append(err); }
  }
  if (content.textContent) messages.push({role: "assistant", content: content.textContent});
  else messages.pop();  // no reply: forget the question too, so the next request stays valid
  controller = null; $("send").disabled = false; $("stop").disabled = true; document.body.dataset.state = "idle";
}

$("form").addEventListener("submit", e => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (text && !controller) { $("input").value = ""; send(text); }
});
$("input").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); } });
$("stop").addEventListener("click", () => controller && controller.abort());
$("new").addEventListener("click", () => { if (controller) controller.abort(); messages = []; $("log").textContent = ""; });
$("show_think").addEventListener("change", e => document.body.classList.toggle("show-think", e.target.checked));

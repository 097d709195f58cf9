// The chat page of `python -m minimind.serve` (chapter 11): the conversation lives here, in `messages`;
// each turn posts all of it with stream: true and appends the streamed deltas to the reply as text.
// With `--tools` the server lists tools at GET tools: the page offers them, runs each call the model makes
// (POST tools/call), shows it, sends the result back as a `tool` message and lets the model reply again.
const $ = id => document.getElementById(id);
const MAX_ROUNDS = 4;  // replies per message when tools are called
let messages = [], controller = null;
const modelName = fetch("v1/models").then(r => r.json()).then(j => ($("model").textContent = j.data[0].id));
const tools = fetch("tools").then(r => r.ok ? r.json() : {data: []}).then(j => j.data).catch(() => []);
tools.then(t => { if (t.length) $("tools").textContent = "tools: " + t.map(x => x.function.name).join(", "); });

function part(parent, cls) {  // a div of the reply: think, content, tool
  const d = document.createElement("div"); d.className = cls; parent.append(d); return d;
}

function bubble(role) {
  const d = document.createElement("div");
  d.className = "msg " + role; part(d, "think"); part(d, "content");
  $("log").append(d); $("log").scrollTop = $("log").scrollHeight;
  return d;
}

async function post(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                              body: JSON.stringify(body), signal: controller.signal});
  if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error(j.error ? j.error.message : r.statusText); }
  return r;
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

// One reply, streamed into `think` and `content`; returns the assistant message (tool calls joined by index).
async function reply(out, think, content) {
  const offered = await tools, msg = {role: "assistant", content: "", reasoning_content: ""}, calls = [];
  const body = {model: await modelName, messages, stream: true, temperature: +$("temperature").value,
                top_p: +$("top_p").value, max_tokens: +$("max_tokens").value, ...(offered.length ? {tools: offered} : {})};
  await readEvents(await post("v1/chat/completions", body), j => {
    if (j.error) throw new Error(j.error.message);
    const d = (j.choices[0] || {}).delta || {};
    if (d.reasoning_content) { think.textContent += d.reasoning_content; msg.reasoning_content += d.reasoning_content; }  // text, never HTML
    if (d.content) { content.textContent += d.content; msg.content += d.content; }
    for (const c of d.tool_calls || []) {
      const call = calls[c.index] = calls[c.index] || {id: "", type: "function", function: {name: "", arguments: ""}};
      call.id += c.id || ""; call.function.name += (c.function || {}).name || ""; call.function.arguments += (c.function || {}).arguments || "";
    }
    out.dataset.chunks = +out.dataset.chunks + 1;
    $("log").scrollTop = $("log").scrollHeight;
  });
  if (calls.length) msg.tool_calls = calls;
  if (!msg.reasoning_content) delete msg.reasoning_content;
  return msg;
}

// Run one call on the server; show `[tool] name(arguments) -> result`; return the `tool` message.
async function runTool(out, call) {
  const r = await (await post("tools/call", {name: call.function.name, arguments: call.function.arguments})).json();
  const line = part(out, "tool" + (r.error ? " failed" : ""));
  line.textContent = `[tool] ${call.function.name}(${call.function.arguments}) -> ${r.content}`;
  return {role: "tool", tool_call_id: call.id, content: r.content || "(empty)"};
}

async function send(text) {
  const before = messages.length;
  messages.push({role: "user", content: text});
  bubble("user").querySelector(".content").textContent = text;
  const out = bubble("assistant");
  let think = out.querySelector(".think"), content = out.querySelector(".content");
  out.dataset.chunks = 0;
  document.body.dataset.state = "busy"; $("send").disabled = true; $("stop").disabled = false;
  controller = new AbortController();
  let answered = false;
  try {
    for (let round = 0; round < MAX_ROUNDS; round++) {
      if (round) { think = part(out, "think"); content = part(out, "content"); }
      const msg = await reply(out, think, content);
      if (!msg.content && !msg.tool_calls) break;
      messages.push(msg);
      if (!msg.tool_calls) { answered = true; break; }
      for (const call of msg.tool_calls) messages.push(await runTool(out, call));
      answered = true;
    }
  } catch (e) {
    if (e.name !== "AbortError") { const err = document.createElement("div"); err.className = "error"; err.textContent = e.message; out.append(err); }
  }
  const last = messages[messages.length - 1];
  if (last.role === "assistant" && last.tool_calls) messages.pop();  // calls without results: the next request would be refused
  if (!answered || messages.length === before + 1) messages.length = before;  // no reply: forget the question too
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

"The OpenAI-compatible server: the official client, concurrent streams, disconnects, bad requests, the chat page."
import asyncio
import base64
import fcntl
import json
import os
import select
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import matplotlib.pyplot as plt
import numpy as np
import pytest

import minimind.serve as serve
from minimind.api import APIError, Limits, parse_chat_request
from minimind.chat import ChatModel
from minimind.generate import generate_text
from minimind.serve import BackgroundServer, Job, RoundRobinScheduler, build_parser, make_app
from minimind.tools import Tool, ToolRegistry, tinyworld_tools, tools_tokenizer
from minimind.tokenizer import tinyworld_tokenizer

from conftest import micro, run_cli


@pytest.fixture(scope="module")
def server(quick):
    app = make_app(quick)
    with BackgroundServer(app) as srv:
        yield srv, app, quick


@pytest.fixture(scope="module")
def random_server(tok):
    "A random `micro` model: its greedy replies run to max_tokens, so a cancelled stream is certainly cut short."
    model = micro(vocab_size=len(tok)).eval()
    cm = ChatModel(model, tok, Path("micro"))
    app = make_app(cm, limits=Limits(context=512, max_tokens=500))
    with BackgroundServer(app) as srv:
        yield srv, app, cm


def chat(cm, content, **kw):
    return {"model": cm.name, "messages": [{"role": "user", "content": content}], **kw}


def wait_for(cond, timeout=30):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout: raise TimeoutError
        time.sleep(0.01)


# ---- the official client -------------------------------------------------------------------------------------

def test_openai_client_plain_and_streamed(server):
    openai = pytest.importorskip("openai")
    srv, app, cm = server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [cm.name]
    msgs = [{"role": "user", "content": "What colour is Mimi?"}]
    want = generate_text(cm.model, cm.tokenizer, [msgs], 30, temperature=0.7, top_p=0.9, seed=5)[0]
    r = client.chat.completions.create(model=cm.name, messages=msgs, max_tokens=30, temperature=0.7, top_p=0.9, seed=5)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(cm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert r.usage.prompt_tokens == n_prompt and 1 <= r.usage.completion_tokens <= 30
    chunks = list(client.chat.completions.create(model=cm.name, messages=msgs, max_tokens=30, temperature=0.7,
                                                 top_p=0.9, seed=5, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_max_tokens_stop_and_seed_are_honoured(server):
    srv, app, cm = server
    url = f"{srv.url}/v1/chat/completions"
    r = httpx.post(url, json=chat(cm, "Tell me a story.", max_tokens=7, temperature=1.0, seed=1, stop=[]), timeout=60).json()
    full = httpx.post(url, json=chat(cm, "Tell me a story.", max_tokens=40, temperature=1.0, seed=1), timeout=60).json()
    text = full["choices"][0]["message"]["content"]
    assert r["usage"]["completion_tokens"] <= 7
    assert text.startswith(r["choices"][0]["message"]["content"])  # the same seed: the same start
    stop = text[5:8]
    cut = httpx.post(url, json=chat(cm, "Tell me a story.", max_tokens=40, temperature=1.0, seed=1, stop=stop), timeout=60).json()
    assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    other = [httpx.post(url, json=chat(cm, "Tell me a story.", max_tokens=40, temperature=1.0, seed=s), timeout=60).json()
             for s in (2, 3)]
    assert any(o["choices"][0]["message"]["content"] != text for o in other)  # another seed, another story


# ---- concurrency ---------------------------------------------------------------------------------------------

async def _stream(ac, url, body):
    "Read one streamed completion; return its text, finish reason and whether it ended with [DONE]."
    text, finish, done = "", None, False
    async with ac.stream("POST", url, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line == "data: [DONE]": done = True
            elif line.startswith("data: "):
                ch = json.loads(line[6:])["choices"][0]
                text += ch["delta"].get("content") or ""
                finish = ch["finish_reason"] or finish
    return text, finish, done


def test_sixteen_concurrent_streams_each_get_their_own_answer(server):
    srv, app, cm = server
    questions = [f"{w} number {i}?" for i, w in enumerate(["Who is", "Where is", "What eats", "Tell me about"] * 4)]
    bodies = [chat(cm, q, max_tokens=20 + i, temperature=0.9, top_p=0.95, seed=100 + i, stream=True) for i, q in enumerate(questions)]

    async def main():
        async with httpx.AsyncClient(timeout=300) as ac:
            return await asyncio.gather(*(_stream(ac, f"{srv.url}/v1/chat/completions", b) for b in bodies))
    got = asyncio.run(main())
    assert app.state.scheduler.stats["finished"] >= 16
    for (text, finish, done), b in zip(got, bodies):
        want = generate_text(cm.model, cm.tokenizer, [b["messages"]], b["max_tokens"], temperature=0.9, top_p=0.95, seed=b["seed"])[0]
        assert text == want and done and finish in ("stop", "length")
    assert len({t for t, _, _ in got}) > 8  # different prompts and seeds: different answers


def test_round_robin_serves_requests_side_by_side(random_server):
    "A short request sent after a long one finishes first: nobody waits for a whole reply ahead of it."
    srv, app, cm = random_server
    url = f"{srv.url}/v1/chat/completions"
    order = []

    def go(name, n):
        httpx.post(url, json=chat(cm, "hello", max_tokens=n, temperature=0), timeout=120)
        order.append(name)
    long = threading.Thread(target=go, args=("long", 450)); long.start()
    wait_for(lambda: app.state.scheduler.stats["active"] >= 1)
    go("short", 5)
    long.join()
    assert order == ["short", "long"]


# ---- disconnects and bad requests ----------------------------------------------------------------------------

def test_client_disconnect_stops_generation(random_server):
    srv, app, cm = random_server
    body = chat(cm, "hello", max_tokens=450, temperature=0, stream=True)
    want = generate_text(cm.model, cm.tokenizer, [body["messages"]], 450, temperature=0)[0]
    assert len(cm.tokenizer.encode(want)) >= 400  # the reply would run to max_tokens
    stats = app.state.scheduler.stats
    before = dict(stats)
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        while not next(lines).startswith('data: {"id"'): pass  # the first event, then hang up
    wait_for(lambda: stats["cancelled"] > before["cancelled"])
    assert stats["finished"] == before["finished"] and stats["active"] == 0
    assert stats["tokens"] == before["tokens"]  # the cancelled job's tokens were never counted as a finished reply
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=chat(cm, "hi", max_tokens=3), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # still serving


CALC = {"type": "function", "function": {"name": "add", "description": "Add two integers: a + b.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
CALLED = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}


@pytest.mark.parametrize("what,body,status,param", [
    ("bad JSON", b'{"model": ', 400, None),
    ("not an object", b'[1, 2]', 400, None),
    ("unknown model", {"model": "gpt-4"}, 404, "model"),
    ("model not a string", {"model": 3}, 400, "model"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("late system", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400, "messages[1].role"),
    ("role marker", {"messages": [{"role": "user", "content": "a<|im_start|>system"}]}, 400, "messages[0].content"),
    ("temperature as text", {"temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {"temperature": 7}, 400, "temperature"),
    ("top_p zero", {"top_p": 0}, 400, "top_p"),
    ("max_tokens as bool", {"max_tokens": True}, 400, "max_tokens"),
    ("max_tokens float", {"max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "max_tokens"),
    ("absurd max_tokens", {"max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens past the context", {"max_tokens": 490, "messages": [{"role": "user", "content": "hi " * 60}]}, 400, "max_tokens"),
    ("over-long input", {"messages": [{"role": "user", "content": "hello world " * 400}]}, 400, "messages"),
    ("bad stop", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("seed negative", {"seed": -1}, 400, "seed"),
    ("stream not bool", {"stream": "yes"}, 400, "stream"),
    ("n = 2", {"n": 2}, 400, "n"),
    ("unknown field", {"temprature": 0.5}, 400, "temprature"),
    ("a 5000-digit number", b'{"model": "m", "seed": ' + b"7" * 5000 + b"}", 400, None),
    ("tools not a list", {"tools": {"add": {}}}, 400, "tools"),
    ("tool without function", {"tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("bad tool name", {"tools": [CALC, {"type": "function", "function": {"name": "two words"}}]}, 400, "tools[1].function.name"),
    ("tool listed twice", {"tools": [CALC, CALC]}, 400, "tools[1].function.name"),
    ("tool parameters not a schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, 400, "tools[0].function.parameters"),
    ("role marker in a tool", {"tools": [{"type": "function", "function": {"name": "f", "description": "<|im_end|>"}}]}, 400, "tools[0]"),
    ("unknown tool_choice", {"tools": [CALC], "tool_choice": "sometimes"}, 400, "tool_choice"),
    ("tool_choice names no tool", {"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, 400, "tool_choice.function.name"),
    ("required without tools", {"tool_choice": "required"}, 400, "tool_choice"),
    ("forced call and thinking", {"tools": [CALC], "tool_choice": "required", "chat_template_kwargs": {"enable_thinking": True}}, 400, "tool_choice"),
    ("tool message without a call", {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c", "content": "3"}]}, 400, "messages[1].role"),
    ("tool message after plain reply", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                      {"role": "tool", "tool_call_id": "c", "content": "3"}]}, 400, "messages[2].role"),
    ("tool_call_id of no call", {"messages": [{"role": "user", "content": "a"}, CALLED, {"role": "tool", "tool_call_id": "call_9", "content": "3"}]}, 400, "messages[2].tool_call_id"),
    ("call arguments not JSON", {"messages": [{"role": "user", "content": "a"}, {**CALLED, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{a: 1"}}]}]}, 400, "messages[1].tool_calls[0].function.arguments"),
    ("null content without calls", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]}, 400, "messages[1].content"),
    ("reasoning not text", {"messages": [{"role": "user", "content": "a"}, {**CALLED, "reasoning_content": 3}]}, 400, "messages[1].reasoning_content"),
    ("chat_template_kwargs not an object", {"chat_template_kwargs": "think"}, 400, "chat_template_kwargs"),
    ("chat_template_kwargs unknown key", {"chat_template_kwargs": {"temperature": 1}}, 400, "chat_template_kwargs.temperature"),
    ("enable_thinking not a bool", {"chat_template_kwargs": {"enable_thinking": "yes"}}, 400, "chat_template_kwargs.enable_thinking"),
    ("thinking switches disagree", {"chat_template_kwargs": {"enable_thinking": True, "open_thinking": False}}, 400, "chat_template_kwargs"),
    ("one call per reply", {"tools": [CALC], "parallel_tool_calls": False}, 400, "parallel_tool_calls"),
])
def test_bad_requests_get_openai_errors(random_server, what, body, status, param):
    srv, app, cm = random_server
    if isinstance(body, dict): body = json.dumps({**chat(cm, "hi"), **body}).encode()
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, (what, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_an_integer_range_is_written_whole(random_server):
    srv, app, cm = random_server
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={**chat(cm, "hi"), "seed": -1}, timeout=30)
    assert r.json()["error"]["message"] == "seed must be an integer from 0 to 9223372036854775807, got -1"  # not 9.22337e+18


def test_server_survives_malformed_requests_and_framework_errors(random_server):
    srv, app, cm = random_server
    url = f"{srv.url}/v1/chat/completions"
    big = httpx.post(url, content=b"x" * 2_000_001, headers={"Content-Type": "application/json"}, timeout=30)
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
    assert httpx.get(url).status_code == 405 and "error" in httpx.get(url).json()
    nope = httpx.get(f"{srv.url}/nope")
    assert nope.status_code == 404 and nope.json()["error"]["code"] == "not_found"
    assert "GET /nope: no such endpoint" in nope.json()["error"]["message"] and "/v1/chat/completions" in nope.json()["error"]["message"]
    for junk in [b"", b"\xff\xfe", b"null", b'{"messages": null}', json.dumps({"model": cm.name, "messages": [None]}).encode()]:
        assert httpx.post(url, content=junk, timeout=30).status_code == 400
    r = httpx.post(url, json=chat(cm, "hi", max_tokens=2), timeout=30)
    assert r.status_code == 200 and httpx.get(f"{srv.url}/health").json()["status"] == "ok"


def test_validation_is_a_pure_function(quick):
    "parse_chat_request gives the prompt ids of the chat template and the defaults, without a server."
    tok, limits = quick.tokenizer, Limits(context=100, default_max_tokens=50)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = parse_chat_request(json.dumps({"model": "m", "messages": msgs}).encode(), tok, "m", limits)
    ids = tok.apply_chat_template([msgs[0], {"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    assert r.prompt_ids == ids and r.max_tokens == min(50, 100 - len(ids))
    assert r.sampling == dict(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    with pytest.raises(APIError, match="context_length_exceeded|100 positions") as e:
        parse_chat_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 200}]}).encode(), tok, "m", limits)
    assert e.value.code == "context_length_exceeded"


def test_full_queue_is_refused_with_503(quick):
    scheduler = RoundRobinScheduler(quick.model, quick.tokenizer, max_active=1, max_queue=2)  # not started: nothing is taken
    r = parse_chat_request(json.dumps(chat(quick, "hi")).encode(), quick.tokenizer, quick.name, Limits(context=512))
    for _ in range(2): scheduler.submit(Job(r, emit=lambda ev: None))
    with pytest.raises(APIError) as e: scheduler.submit(Job(r, emit=lambda ev: None))
    assert e.value.status == 503 and e.value.body()["error"]["code"] == "server_overloaded"


def test_api_key_and_localhost_default(quick):
    assert build_parser().parse_args(["--model", "x"]).host == "127.0.0.1"
    app = make_app(quick, api_key="sekret")
    with BackgroundServer(app) as srv:
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        ok = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == quick.name


def test_command_line_reports_a_bad_model(tmp_path):
    out = run_cli("--model", tmp_path / "nothing", module="minimind.serve")
    assert out.returncode == 1 and "no such file or folder" in out.stderr


# ---- the chat page -------------------------------------------------------------------------------------------

def test_chat_page_and_its_files_are_served_from_the_package(random_server):
    "The page, its stylesheet and its script come from minimind/static (package data), under the URLs the page uses."
    srv, app, cm = random_server
    page = httpx.get(f"{srv.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in [("chat.css", "text/css"), ("chat.js", "javascript")]:
        assert f'"static/{name}"' in page.text
        r = httpx.get(f"{srv.url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 100
    assert "no such endpoint" in httpx.get(f"{srv.url}/static/nothing.js").json()["error"]["message"]


class Chromium:
    "Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4), so no websocket library is needed."
    def __init__(self, exe):
        self.profile = tempfile.mkdtemp()
        cmd_r, self.cmd_w = os.pipe()   # we write commands; chromium reads them on fd 3
        self.res_r, res_w = os.pipe()   # chromium writes replies on fd 4
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, res_w)]
        for fd in (cmd_r, res_w): os.close(fd)
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}", "about:blank"]
        self.pid = os.posix_spawn(exe, args, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, hi[0], 3), (os.POSIX_SPAWN_DUP2, hi[1], 4),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
        for fd in hi: os.close(fd)
        self.buf, self.n = b"", 0

    def send(self, method, session=None, timeout=60, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        t0 = time.monotonic()
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.n:
                    if "error" in reply: raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = timeout - (time.monotonic() - t0)
            if left <= 0 or not select.select([self.res_r], [], [], left)[0]: raise TimeoutError(method)
            chunk = os.read(self.res_r, 1 << 16)
            if not chunk: raise RuntimeError("chromium exited")
            self.buf += chunk

    def js(self, session, expr):
        r = self.send("Runtime.evaluate", session, expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r: raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def screenshot(self, session, path):
        "Save what the page shows as a PNG at `path`."
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", session, format="png")["data"]))

    def close(self):
        try: self.send("Browser.close", timeout=5)
        except Exception: pass
        for _ in range(100):
            if os.waitpid(self.pid, os.WNOHANG)[0]: break
            time.sleep(0.05)
        else:
            os.kill(self.pid, 9); os.waitpid(self.pid, 0)
        os.close(self.cmd_w); os.close(self.res_r)
        shutil.rmtree(self.profile, ignore_errors=True)


def test_chat_page_streams_a_reply_in_chromium(server):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None: pytest.skip("no chromium on PATH: the browser test of the chat page needs a headless Chromium")
    srv, app, cm = server
    browser = Chromium(exe)
    try:
        target = browser.send("Target.createTarget", url=srv.url + "/")["targetId"]
        s = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        wait_for(lambda: browser.js(s, "(document.getElementById('model') || {}).textContent") == cm.name)
        browser.js(s, """(() => {
            document.getElementById('temperature').value = '0';
            document.getElementById('max_tokens').value = '40';
            document.getElementById('input').value = 'Who are you?';
            document.getElementById('form').requestSubmit(); })()""")
        wait_for(lambda: browser.js(s, "document.body.dataset.state") == "busy", timeout=10)
        wait_for(lambda: browser.js(s, "document.body.dataset.state") == "idle", timeout=120)
        reply = browser.js(s, "document.querySelector('.assistant .content').textContent")
        chunks = int(browser.js(s, "document.querySelector('.assistant').dataset.chunks"))
        errors = browser.js(s, "document.querySelectorAll('.error').length")
    finally:
        browser.close()
    want = generate_text(cm.model, cm.tokenizer, [[{"role": "user", "content": "Who are you?"}]], 40, temperature=0, top_p=0.9)[0]
    assert errors == 0 and reply == want
    assert chunks >= 3  # the role chunk, several content pieces, the finish chunk: it was streamed


# ---- tools over the API --------------------------------------------------------------------------------------

def _boom(): raise ZeroDivisionError("the tool broke")


@pytest.fixture(scope="module")
def tool_server(tok):
    "A server with TinyWorld's tools and two broken ones; the model's text comes from the `script` fixture."
    cm = ChatModel(micro(vocab_size=len(tok)).eval(), tok, Path("micro"))
    registry = ToolRegistry([*tinyworld_tools().tools.values(),
                             Tool("boom", "Always fails.", {"type": "object", "properties": {}}, _boom),
                             Tool("odd", "Returns what JSON cannot write.", {"type": "object", "properties": {}}, lambda: {1, 2})])
    app = make_app(cm, limits=Limits(context=4096), tools=registry)
    with BackgroundServer(app) as srv:
        yield srv, app, cm


@pytest.fixture
def script(monkeypatch):
    """The model's replies, scripted: each request the scheduler runs takes the next text, in 2-character pieces (so
    tags arrive split), and is recorded. A random model never writes a tool call; this one writes what a test says."""
    state = {"replies": [], "requests": []}
    def pieces(model, tokenizer, job):
        state["requests"].append(job.request)
        text, job.finish_reason = state["replies"].pop(0), "stop"
        for k in range(0, len(text), 2):
            job.completion_tokens += 1
            yield text[k:k + 2]
    monkeypatch.setattr(serve, "completion_pieces", pieces)  # the scheduler looks it up on each job
    return state


def call_text(tool, **args): return f'<tool_call>\n{json.dumps({"name": tool, "arguments": args})}\n</tool_call>'


def prompt_of(state, cm, i=-1): return cm.tokenizer.decode(state["requests"][i].prompt_ids)


def test_tool_calls_reach_the_openai_client_plain_and_streamed(tool_server, script):
    openai = pytest.importorskip("openai")
    srv, app, cm = tool_server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    msgs = [{"role": "user", "content": "What is 48213 + 9077?"}]
    two = "I will add.\n" + call_text("add", a=48213, b=9077) + "\n" + call_text("lookup", name="Mimi", field="food")
    script["replies"] += [call_text("add", a=48213, b=9077), two, two]

    r = client.chat.completions.create(model=cm.name, messages=msgs, tools=[CALC])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [("function", "add", {"a": 48213, "b": 9077})]
    assert m.tool_calls[0].id.startswith("call_")
    prompt = prompt_of(script, cm)
    assert "<tools>" in prompt and json.dumps(CALC) in prompt and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    chunks = list(client.chat.completions.create(model=cm.name, messages=msgs, tools=[CALC], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            e = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            e["id"] += d.id or ""; e["name"] += d.function.name or ""; e["arguments"] += d.function.arguments or ""
    assert content == "I will add." and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == [
        ("add", {"a": 48213, "b": 9077}), ("lookup", {"name": "Mimi", "field": "food"})]
    assert calls[0]["id"] != calls[1]["id"]
    assert not any("<" in (c.choices[0].delta.content or "") for c in chunks if c.choices)  # no tag leaked, not even half of one

    with client.chat.completions.stream(model=cm.name, messages=msgs, tools=[CALC]) as stream:
        final = stream.get_final_completion()
    fm = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and fm.content == "I will add."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in fm.tool_calls] == [
        ("add", {"a": 48213, "b": 9077}), ("lookup", {"name": "Mimi", "field": "food"})]


def test_a_tool_result_goes_back_into_the_prompt(tool_server, script):
    openai = pytest.importorskip("openai")
    srv, app, cm = tool_server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    msgs = [{"role": "user", "content": "What is 48213 + 9077?"}]
    script["replies"] += [call_text("add", a=48213, b=9077), "48213 + 9077 = 57290."]
    first = client.chat.completions.create(model=cm.name, messages=msgs, tools=[CALC]).choices[0].message
    call = first.tool_calls[0]
    msgs += [first, {"role": "tool", "tool_call_id": call.id, "content": "57290"}]  # the client's message object, as sent back
    r = client.chat.completions.create(model=cm.name, messages=msgs, tools=[CALC])
    assert r.choices[0].message.content == "48213 + 9077 = 57290." and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    prompt = prompt_of(script, cm)
    assert ('<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 48213, "b": 9077}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n57290\n</tool_response><|im_end|>\n') in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_reasoning_content_is_separate_from_content(tool_server, script):
    openai = pytest.importorskip("openai")
    srv, app, cm = tool_server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    msgs, think = [{"role": "user", "content": "What is 2 + 2?"}], {"chat_template_kwargs": {"enable_thinking": True}}
    reply = "Two and two.\n</think>\n\nThe answer is 4."
    script["replies"] += [reply, reply]
    m = client.chat.completions.create(model=cm.name, messages=msgs, tools=[CALC], extra_body=think).choices[0].message
    assert m.content == "The answer is 4." and m.model_extra["reasoning_content"] == "Two and two."
    assert prompt_of(script, cm).endswith("<|im_start|>assistant\n<think>\n")
    chunks = list(client.chat.completions.create(model=cm.name, messages=msgs, tools=[CALC], extra_body=think, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Two and two."
    assert "".join(d.content or "" for d in deltas) == "The answer is 4."
    assert not any("<" in ((d.model_extra or {}).get("reasoning_content") or "") + (d.content or "") for d in deltas)


def test_thinking_switch_and_the_template_choice(tok):
    "Pure validation: the switch sets the prompt's end; the template that renders tools is the tokenizer's own if it can."
    limits = Limits(context=4096)
    def prompt(tokenizer=tok, **kw):
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **kw}
        r = parse_chat_request(json.dumps(body).encode(), tokenizer, "m", limits)
        return tokenizer.decode(r.prompt_ids), r
    on, r_on = prompt(tools=[CALC], chat_template_kwargs={"enable_thinking": True})
    off, r_off = prompt(tools=[CALC], chat_template_kwargs={"open_thinking": False})
    assert on.endswith("assistant\n<think>\n") and r_on.think_open
    assert off.endswith("assistant\n<think>\n\n</think>\n\n") and not r_off.think_open
    assert on[:-len("<think>\n")] == off[:-len("<think>\n\n</think>\n\n")]  # only the end differs
    plain, _ = prompt()
    assert plain == tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)  # no tools: the model's template
    none, r_none = prompt(tools=[CALC], tool_choice="none")
    assert none == plain and r_none.tools is None  # tools not offered: not rendered, not parsed
    native = tools_tokenizer(tinyworld_tokenizer(small=True))
    assert prompt(native, tools=[CALC])[0] == off  # a template that renders tools is used as it is
    forced, r = prompt(tools=[CALC], tool_choice={"type": "function", "function": {"name": "add"}})
    assert forced.endswith('</think>\n\n<tool_call>\n{"name": "add", "arguments": ') and r.prefill.startswith("<tool_call>")
    assert prompt(tools=[CALC], tool_choice="required")[0].endswith('</think>\n\n<tool_call>\n{"name": "')


def test_forced_and_refused_tool_calls(tool_server, script):
    srv, app, cm = tool_server
    url = f"{srv.url}/v1/chat/completions"
    script["replies"] += ['{"a": 1, "b": 2}}\n</tool_call>', 'add", "arguments": {"a": 5, "b": 6}}\n</tool_call>', call_text("add", a=1, b=2)]
    named = httpx.post(url, json=chat(cm, "1 + 2?", tools=[CALC], tool_choice={"type": "function", "function": {"name": "add"}}), timeout=30).json()
    call = named["choices"][0]["message"]["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == ("add", {"a": 1, "b": 2})
    events = _sse(url, chat(cm, "5 + 6?", tools=[CALC], tool_choice="required", stream=True))
    assert [d["function"]["name"] for e in events for d in e["delta"].get("tool_calls", [])] == ["add"]
    refused = httpx.post(url, json=chat(cm, "1 + 2?", tools=[CALC], tool_choice="none"), timeout=30).json()["choices"][0]
    assert refused["message"]["content"] == call_text("add", a=1, b=2) and "tool_calls" not in refused["message"]
    assert refused["finish_reason"] == "stop" and "<tools>" not in prompt_of(script, cm)


def _sse(url, body):
    "The choices of every chunk of a streamed completion."
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        return [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]


@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": add, "arguments": {}}\n</tool_call>',      # not JSON
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',             # no name
    'Sure: <tool_call>\n{"name": "add", "arguments": {"a": 1',        # never closed
])
def test_a_malformed_tool_call_comes_back_as_content(tool_server, script, reply):
    srv, app, cm = tool_server
    url = f"{srv.url}/v1/chat/completions"
    script["replies"] += [reply, reply]
    r = httpx.post(url, json=chat(cm, "1 + 2?", tools=[CALC]), timeout=30)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == reply and "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    events = _sse(url, chat(cm, "1 + 2?", tools=[CALC], stream=True))
    assert "".join(e["delta"].get("content") or "" for e in events) == reply
    assert not any("tool_calls" in e["delta"] for e in events) and events[-1]["finish_reason"] == "stop"


def test_tools_endpoints_run_calls_and_never_crash(tool_server, random_server):
    srv, app, cm = tool_server
    listed = httpx.get(f"{srv.url}/tools").json()["data"]
    assert [t["function"]["name"] for t in listed] == ["add", "subtract", "multiply", "lookup", "boom", "odd"]
    def call(body):
        r = httpx.post(f"{srv.url}/tools/call", content=body if isinstance(body, bytes) else json.dumps(body), timeout=30)
        return r.status_code, r.json()
    assert call({"name": "add", "arguments": {"a": 1, "b": 2}}) == (200, {"name": "add", "content": "3", "error": False})
    assert call({"name": "multiply", "arguments": '{"a": 6, "b": 7}'})[1]["content"] == "42"  # arguments as a JSON string
    for body, says in [({"name": "divide", "arguments": {"a": 1, "b": 2}}, "error: unknown tool 'divide'"),
                       ({"name": "add", "arguments": {"a": "1", "b": 2}}, "error: add: argument 'a' must be an integer"),
                       ({"name": "add", "arguments": {"a": 1}}, "error: add: missing argument 'b'"),
                       ({"name": "add", "arguments": "{a: 1"}, "error: arguments are not valid JSON"),
                       ({"arguments": {}}, 'error: a tool call needs a JSON object with a "name" string'),
                       ({"name": "lookup", "arguments": {"name": "Nobody", "field": "food"}}, "error: lookup failed: ValueError"),
                       ({"name": "boom", "arguments": {}}, "error: boom failed: ZeroDivisionError: the tool broke"),
                       ({"name": "odd", "arguments": {}}, "error: odd failed: TypeError")]:
        status, got = call(body)
        assert status == 200 and got["error"] and got["content"].startswith(says), (body, got)
    for junk, param in [(b"{oops", None), (b"[1, 2]", None), (b'{"name": "add", "args": {}}', "args")]:
        status, got = call(junk)
        assert status == 400 and got["error"]["param"] == param and got["error"]["message"]
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    plain, _, _ = random_server  # a server without --tools has no tool endpoints
    assert httpx.get(f"{plain.url}/tools").status_code == 404
    assert build_parser().parse_args(["--model", "x", "--tools"]).tools and not build_parser().parse_args(["--model", "x"]).tools


def test_chat_page_runs_tool_calls_in_chromium(tool_server, script, tmp_path):
    """A scripted model calls `add`; the page runs the call and shows it. The page is photographed when the answer is in:
    set MINIMIND_SCREENSHOTS to a folder to keep the picture (chapter 11's figure of the chat page comes from here)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None: pytest.skip("no chromium on PATH: the browser test of the chat page needs a headless Chromium")
    srv, app, cm = tool_server
    script["replies"] += [call_text("add", a=1, b=2), "1 + 2 = 3."]
    browser = Chromium(exe)
    try:
        target = browser.send("Target.createTarget", url=srv.url + "/")["targetId"]
        s = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Emulation.setDeviceMetricsOverride", s, width=900, height=420, deviceScaleFactor=1, mobile=False)
        wait_for(lambda: "add" in (browser.js(s, "(document.getElementById('tools') || {}).textContent") or ""))
        browser.js(s, "document.getElementById('input').value = 'What is 1 + 2?'; document.getElementById('form').requestSubmit()")
        wait_for(lambda: browser.js(s, "document.body.dataset.state") == "busy", timeout=10)
        wait_for(lambda: browser.js(s, "document.body.dataset.state") == "idle", timeout=60)
        tool_lines = browser.js(s, "[...document.querySelectorAll('.assistant .tool')].map(d => d.textContent)")
        text = browser.js(s, "[...document.querySelectorAll('.assistant .content')].map(d => d.textContent).join('|')")
        errors = browser.js(s, "document.querySelectorAll('.error').length")
        browser.screenshot(s, tmp_path/"chat_page.png")
    finally:
        browser.close()
    shot = plt.imread(tmp_path/"chat_page.png")  # height x width x RGBA
    assert shot.shape[:2] == (420, 900) and len(np.unique(shot.reshape(-1, shot.shape[-1]), axis=0)) > 16  # drawn, not blank
    if os.environ.get("MINIMIND_SCREENSHOTS"): shutil.copy(tmp_path/"chat_page.png", Path(os.environ["MINIMIND_SCREENSHOTS"]))
    assert errors == 0 and tool_lines == ['[tool] add({"a": 1, "b": 2}) -> 3'] and text == "|1 + 2 = 3."
    first, second = script["requests"]
    assert [t["function"]["name"] for t in first.tools] == ["add", "subtract", "multiply", "lookup", "boom", "odd"]
    assert [m["role"] for m in second.messages] == ["user", "assistant", "tool"] and second.messages[2]["content"] == "3"
    assert second.messages[2]["tool_call_id"] == second.messages[1]["tool_calls"][0]["id"]

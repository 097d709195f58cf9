"The OpenAI-compatible server: the official client, concurrent streams, disconnects, bad requests, the chat page."
import asyncio
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
import pytest

from minimind.chat import ChatModel
from minimind.generate import generate_text
from minimind.serve import (APIError, BackgroundServer, Job, Limits, RoundRobinScheduler, build_parser, make_app,
                            parse_chat_request)

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
    ("tools", {"tools": [{"type": "function"}]}, 400, "tools"),
])
def test_bad_requests_get_openai_errors(random_server, what, body, status, param):
    srv, app, cm = random_server
    if isinstance(body, dict): body = json.dumps({**chat(cm, "hi"), **body}).encode()
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, (what, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


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

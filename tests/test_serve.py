"""``llmzoo serve``: the real server (uvicorn, on a free localhost port, in a thread of this process) with a tiny
Llama and a byte-level BPE, called with the official ``openai`` client: completions and chat, streamed and not,
``stop``, ``usage``, ``seed``, greedy text equal to ``llmzoo generate``'s; batching; faults (a client killed
mid-stream, malformed requests, an oversize prompt, a missing API key) after which the next good request is
answered; and the command's one-line errors."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model

openai = pytest.importorskip("openai")
try:
    import httpx2 as httpx  # what openai calls HTTP with
except ModuleNotFoundError:
    httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from llmzoo.cli import main  # noqa: E402
from llmzoo.cli.serve import build_app, serve_in_thread  # noqa: E402
from llmzoo.data import Tokenizer  # noqa: E402
from llmzoo.hf import convert_hf_to_checkpoint, to_hf  # noqa: E402

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. ")
KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: a tiny Llama (random weights, context 256) as a checkpoint, its API key KEY."""
    tmp = tmp_path_factory.mktemp("serve")
    tokenizer = Tokenizer.train_bpe([TEXT] * 10, vocab_size=300)
    torch.manual_seed(0)
    to_hf(tiny_model("Llama", vocab_size=tokenizer.vocab_size, max_position_embeddings=256), tmp / "hf", tokenizer)
    ckpt = convert_hf_to_checkpoint(tmp / "hf", tmp / "tiny.ckpt")
    app = build_app(str(ckpt), max_batch_size=8, api_key=KEY, max_request_bytes=64 << 10)
    base, stop = serve_in_thread(app)
    yield SimpleNamespace(ckpt=ckpt, base=base, engine=app.state.engine, tokenizer=tokenizer,
                          client=openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0))
    stop()


def post(server, path: str, body, key: str | None = KEY, timeout: float = 30) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.base}{path}", content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


def greedy(server, prompt: str = "To be", max_tokens: int = 20) -> str:
    return server.client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                            temperature=0).choices[0].text


def test_completion_greedy_equals_llmzoo_generate_with_usage(server, capsys):
    result = server.client.completions.create(model="tiny", prompt="To be", max_tokens=30, temperature=0)
    try:
        main(["generate", "--ckpt_path", str(server.ckpt), "--prompt", "To be", "--do_sample", "false",
              "--max_new_tokens", "30"])
    except SystemExit as exit_:
        assert not exit_.code
    generated = capsys.readouterr().out
    (choice,) = result.choices
    assert generated == "To be" + choice.text + "\n"
    assert len(choice.text) > 0
    prompt_tokens = len(server.tokenizer.encode("To be"))
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.total_tokens == prompt_tokens + result.usage.completion_tokens
    assert choice.finish_reason == ("length" if result.usage.completion_tokens == 30 else "stop")


def test_streamed_completion_equals_the_whole_one(server):
    whole = greedy(server, "whether 'tis", 25)
    chunks = list(server.client.completions.create(model="tiny", prompt="whether 'tis", max_tokens=25,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices]) > 2  # several chunks, not one at the end
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_stop_ends_the_text_before_the_stop_string(server):
    whole = greedy(server, "To be", 40)
    stop = whole[5:8]
    assert stop and stop in whole
    for stream in (False, True):
        response = server.client.completions.create(model="tiny", prompt="To be", max_tokens=40, temperature=0,
                                                    stop=[stop, "never-there"], stream=stream)
        if stream:
            chunks = list(response)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = response.choices[0].text, response.choices[0].finish_reason
        assert (text, reason) == (whole[:whole.index(stop)], "stop")


def test_seed_reproduces_a_sample_and_n_gives_distinct_rows(server):
    def sampled(seed):
        return [c.text for c in server.client.completions.create(model="tiny", prompt="the", max_tokens=16, n=3,
                                                                 temperature=1.0, top_p=0.95, seed=seed).choices]

    first = sampled(7)
    assert sampled(7) == first
    assert sampled(8) != first
    assert len(set(first)) > 1


def test_chat_streamed_and_not(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"},
                {"role": "assistant", "content": "or not"}, {"role": "user", "content": "the question"}]
    whole = server.client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=20,
                                                  temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and whole.usage.prompt_tokens > 10
    chunks = list(server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    with httpx.stream("POST", f"{server.base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "To be", "max_tokens": 5, "temperature": 0, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list()] == ["tiny.ckpt"]
    assert httpx.get(f"{server.base}/health").json()["status"] == "ok"


def test_concurrent_requests_decode_in_one_batch_and_equal_each_alone(server):
    prompts = ["To be", "the slings and arrows of", "Whether", "a sea of troubles"]
    alone = [greedy(server, p, 12) for p in prompts]
    before = server.engine.stats()
    results = [None] * len(prompts)

    def ask(i):
        results[i] = greedy(server, prompts[i], 12)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    after = server.engine.stats()
    assert after["row_steps"] - before["row_steps"] > after["steps"] - before["steps"]  # steps of several rows


def slow_decode(monkeypatch, engine) -> None:
    """Text decoded 5 ms slower per token: a request of 200 tokens takes a second at least."""
    def slow(ids, decode=engine.decode):
        time.sleep(0.005)
        return decode(ids)

    monkeypatch.setattr(engine, "decode", slow)


def test_a_request_joins_a_running_batch(server, monkeypatch):
    short = greedy(server, "Whether", 8)
    slow_decode(monkeypatch, server.engine)
    batches = server.engine.batches
    with httpx.stream("POST", f"{server.base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "To be", "max_tokens": 200, "temperature": 0, "stream": True,
                            "stop": "never-there"}) as response:
        lines = response.iter_lines()
        first = next(lines)
        (long,) = [r for r in server.engine.running if r.max_tokens == 200]
        assert greedy(server, "Whether", 8) == short
        assert not long.done and server.engine.batches > batches  # answered beside the long one, not after it
        events = [first, *lines]
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {"))
    assert text == greedy(server, "To be", 200)  # the long one, prefilled again with the newcomer: the same text


@pytest.mark.parametrize("body, code, param", [
    (b"{not json", "invalid_json", None),
    ({"prompt": "To be", "temperature": -1}, "invalid_value", "temperature"),
    ({"prompt": "To be", "top_p": 0}, "invalid_value", "top_p"),
    ({"prompt": "To be", "max_tokens": "ten"}, "invalid_value", "max_tokens"),
    ({"prompt": "To be", "frobnicate": 1}, "unknown_parameter", "frobnicate"),
    ({"prompt": "To be", "max_tokens": 100000}, "invalid_value", "max_tokens"),
    ({"prompt": "To be " * 200}, "context_length_exceeded", "prompt"),
    ({"prompt": "x" * (70 << 10)}, "request_too_large", None),
])
def test_bad_requests_are_openai_errors_and_the_server_goes_on(server, body, code, param):
    response = post(server, "/v1/completions", body)
    assert response.status_code == (413 if code == "request_too_large" else 400), response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and error["message"]
    assert greedy(server, "To be", 8) == greedy(server, "To be", 8) != ""


def test_bad_chat_messages_are_refused(server):
    for messages in ([], [{"role": "robot", "content": "hi"}], [{"role": "user"}]):
        response = post(server, "/v1/chat/completions", {"messages": messages})
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")


def test_without_the_api_key_401(server):
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", {"prompt": "To be"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_client_killed_mid_stream_frees_its_row(server):
    with httpx.stream("POST", f"{server.base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "To be", "max_tokens": 120, "temperature": 0, "stream": True,
                            "stop": "never-there"}) as response:
        next(response.iter_lines())
        rows = list(server.engine.running)
    (row,) = [r for r in rows if r.max_tokens == 120]
    deadline = time.monotonic() + 10
    while server.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert row.cancelled and row.finish_reason is None  # left before its 120 tokens (or an eos)
    assert greedy(server, "To be", 8) != ""


def test_a_client_gone_before_a_whole_reply_frees_its_row(server, monkeypatch):
    engine, submitted = server.engine, []

    def submit(rows):
        submitted.extend(rows)
        type(engine).submit(engine, rows)

    monkeypatch.setattr(engine, "submit", submit)
    slow_decode(monkeypatch, engine)  # 240 tokens take 1.2 s at least: the client leaves before
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"prompt": "To be", "max_tokens": 240, "temperature": 0,
                                         "stop": "never-there"}, timeout=0.3)
    (row,) = submitted
    deadline = time.monotonic() + 10
    while not row.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert row.cancelled and row.finish_reason is None and row.completion_tokens < 240
    monkeypatch.undo()
    assert greedy(server, "To be", 8) != ""


def test_cli_errors_are_one_line(server, capsys, tmp_path):
    def error(*args):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *map(str, args)])
        return str(exit_.value.code)

    assert error("--ckpt_path", tmp_path / "missing.ckpt").startswith("llmzoo: error:")
    assert "int3" in error("--ckpt_path", server.ckpt, "--quantize", "int3", "--port", "0")
    port = server.base.rsplit(":", 1)[1]
    message = error("--ckpt_path", server.ckpt, "--port", port)
    assert message.startswith("llmzoo: error: cannot listen on 127.0.0.1:") and "\n" not in message


def test_without_the_serve_extra_one_line(server, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--ckpt_path", str(server.ckpt)])
    assert str(exit_.value.code) == "llmzoo: error: llmzoo serve needs FastAPI and uvicorn: pip install 'llmzoo[serve]'"


def test_import_llmzoo_needs_no_web_stack():
    code = ("import sys, llmzoo, llmzoo.cli, llmzoo.serve.engine; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'openai') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_command_serves_until_stopped(server):
    """``llmzoo serve`` itself, in its own process: a free port (--port 0), the key from LLMZOO_API_KEY."""
    process = subprocess.Popen([sys.executable, "-m", "llmzoo", "serve", "--ckpt_path", str(server.ckpt), "--port", "0"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "LLMZOO_API_KEY": "k2"})
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            assert line, "the server exited"
        base = line.split(" on ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=base, api_key="k2", max_retries=0)
        text = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0).choices[0].text
        assert text == greedy(server, "To be", 20)
        assert httpx.get(f"{base}/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0

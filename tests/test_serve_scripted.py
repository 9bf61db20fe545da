"""`seekwen serve` on a scripted checkpoint (tests/scripted_model.py: its greedy reply is known): the
`<think>` reasoning split, multi-byte UTF-8 streamed and reassembled exactly, stop strings over byte tokens,
503 while loading and when the queue is full, a hypothesis fuzz of the request schema (no 5xx, stays
healthy), and SIGTERM (running requests finish, exit status 0)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scripted_model import ANSWER, REASONING, SCRIPT_TEXT, make_scripted_checkpoint
from serve_util import ServerProcess, http, metric, post_json

from seekwen.server.reasoning import ReasoningSplitter, split_reasoning
from seekwen.tools.common import bundled_model_path

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not (bundled_model_path() / "tokenizer.json").is_file(),
                                reason="bundled tokenizer missing")

MSGS = [{"role": "user", "content": "Say it"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "ckpt")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-scripted") / "server.log"
    srv = ServerProcess(str(checkpoint), "--plain", "--max-batch", "1", "--max-queue", "2", "--max-model-len", "1024",
                        env={"SEEKWEN_SERVE_TEST_LOAD_DELAY": "5"}, log=log)  # room for a busy host
    try:
        # while the model loads: the port answers, /health says 503, generation says 503 in OpenAI's shape
        statuses = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status, raw = http(srv.url + "/health", timeout=2)
            except OSError:
                time.sleep(0.05)
                continue
            statuses.add(status)
            if status == 503:
                code, out = post_json(srv.url + "/v1/completions", {"prompt": "x"})
                if code == 503:
                    assert "loading" in out["error"]["message"]
                else:  # the load finished between the two requests: then the server is ready
                    assert code == 200 and http(srv.url + "/health", timeout=2)[0] == 200, (code, out)
            if status == 200:
                break
            time.sleep(0.05)
        assert statuses == {503, 200}, srv.output()
        yield srv
    finally:
        assert srv.terminate() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_reasoning_split(client):
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=MSGS, temperature=0,
                                       max_tokens=64)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING and msg.content == ANSWER
    assert r.choices[0].finish_reason == "stop"  # EOS
    chunks = list(client.chat.completions.create(model=r.model, messages=MSGS, temperature=0, max_tokens=64,
                                                 stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content_pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert reasoning == REASONING and "".join(content_pieces) == ANSWER
    assert all("\ufffd" not in p for p in content_pieces) and len(content_pieces) > 1  # whole characters, streamed
    # completions have no reasoning split: the text is the whole script
    c = client.completions.create(model=r.model, prompt="Say\n", temperature=0, max_tokens=64)
    assert c.choices[0].text == SCRIPT_TEXT


def test_utf8_stream_reassembles_exactly(client):
    name = client.models.list().data[0].id
    pieces = []
    for chunk in client.completions.create(model=name, prompt="Say\n", temperature=0, max_tokens=64, stream=True):
        pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == SCRIPT_TEXT
    assert all("\ufffd" not in p for p in pieces)
    # each multi-byte character arrived whole: 15 byte tokens made 5 characters
    answer_pieces = [p for p in pieces if p and not p.isascii()]
    assert "".join(answer_pieces).endswith(ANSWER) and all(len(p.encode()) > 1 for p in answer_pieces)


@pytest.mark.parametrize("stop,want", [("😀", "Let me think.</think>中文"), ("文😀é", "Let me think.</think>中"),
                                       ("think.</think>中", "Let me "), ("€", "Let me think.</think>中文😀é")])
def test_stop_strings_over_byte_tokens(client, stop, want):
    name = client.models.list().data[0].id
    r = client.completions.create(model=name, prompt="Say\n", temperature=0, max_tokens=64, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(model=name, prompt="Say\n", temperature=0,
                                                                      max_tokens=64, stop=[stop], stream=True)]
    assert "".join(pieces) == want
    assert stop not in "".join(pieces)


def test_queue_full_is_503(server, client):
    name = client.models.list().data[0].id
    url = server.url + "/v1/completions"
    # --max-batch 1 --max-queue 2: one long request runs, a second with n=2 fills the queue, a third is refused
    results = {}

    def run(key, body):
        results[key] = post_json(url, body)

    long = {"model": name, "prompt": "Say\n", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    t1 = threading.Thread(target=run, args=("long", long))
    t1.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _gauge(server, "seekwen_num_requests_running") < 1:
        time.sleep(0.01)
    t2 = threading.Thread(target=run, args=("queued", {**long, "max_tokens": 4, "n": 2}))
    t2.start()
    while time.monotonic() < deadline and _gauge(server, "seekwen_num_requests_waiting") < 2:
        time.sleep(0.01)
    status, out = post_json(url, {**long, "max_tokens": 4})
    assert status == 503 and "busy" in out["error"]["message"] and out["error"]["code"] == "queue_full"
    status, out = post_json(url, {**long, "max_tokens": 4, "n": 3})  # can never fit: 400
    assert status == 400 and out["error"]["param"] == "n"
    t1.join(60)
    t2.join(60)
    assert results["long"][0] == 200 and results["long"][1]["usage"]["completion_tokens"] == 300
    assert results["queued"][0] == 200 and len(results["queued"][1]["choices"]) == 2


def _gauge(server, name: str) -> float:
    return metric(http(server.url + "/metrics")[1].decode(), name)


# ---- schema fuzz ------------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False,
                    allow_infinity=False) | st.text(max_size=12), lambda c: st.lists(c, max_size=3) |
                    st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
SMALL_INT = st.integers(-3, 24)
FIELDS = {
    "model": st.one_of(st.just("scripted"), st.text(max_size=8), JSON),
    "max_tokens": st.one_of(SMALL_INT, JSON),
    "max_completion_tokens": st.one_of(SMALL_INT, JSON),
    "temperature": st.one_of(st.floats(-1, 3), JSON),
    "top_p": st.one_of(st.floats(-0.5, 1.5), JSON),
    "top_k": st.one_of(st.integers(-3, 5000), JSON),
    "min_p": st.one_of(st.floats(-0.5, 1.5), JSON),
    "seed": st.one_of(st.integers(-(2**65), 2**65), JSON),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=20), JSON),
    "stop_token_ids": st.one_of(st.lists(st.integers(-5, 5000), max_size=4), JSON),
    "n": st.one_of(st.integers(-1, 4), JSON),
    "presence_penalty": st.one_of(st.floats(-3, 3), JSON),
    "frequency_penalty": st.one_of(st.floats(-3, 3), JSON),
    "repetition_penalty": st.one_of(st.floats(-1, 3), JSON),
    "logprobs": st.one_of(st.integers(-2, 25), st.booleans(), JSON),
    "top_logprobs": st.one_of(st.integers(-2, 25), JSON),
    "echo": st.one_of(st.booleans(), JSON),
    "stream": st.one_of(st.booleans(), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "user": st.one_of(st.text(max_size=8), JSON),
    "ignore_eos": st.booleans(),
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-3, 5000), max_size=8),
                        st.lists(st.text(max_size=10), max_size=3),
                        st.lists(st.lists(st.integers(-3, 5000), max_size=4), max_size=3), JSON),
    "messages": st.one_of(st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard", ""])},
        optional={"content": st.one_of(st.text(max_size=30), st.none(), st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=2), JSON),
            "name": st.text(max_size=5)}), max_size=4), JSON),
    "tokens": st.one_of(st.lists(st.integers(-3, 5000), max_size=8), JSON),
    "add_generation_prompt": st.booleans(),
    "add_special_tokens": st.one_of(st.booleans(), JSON),
    "chat_template_kwargs": st.one_of(st.dictionaries(st.text(max_size=6), JSON, max_size=2), JSON),
}
BODIES = st.one_of(st.fixed_dictionaries({}, optional=FIELDS), JSON)
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])


@pytest.mark.slow
def test_schema_fuzz_no_5xx(server):
    seen = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=PATHS, body=BODIES, raw=st.one_of(st.none(), st.binary(max_size=64)))
    @example(path="/tokenize", body={"prompt": "Say"}, raw=None)  # valid requests among the fuzz, every run
    @example(path="/v1/completions", body={"prompt": "Say", "max_tokens": 2}, raw=None)
    def fuzz(path, body, raw):
        data = raw if raw is not None else json.dumps(body)
        status, out = http(server.url + path, "POST", data, {"Content-Type": "application/json"}, timeout=60)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (path, data[:300], out[:300])
        if status >= 400:
            err = json.loads(out)["error"]
            assert isinstance(err["message"], str) and len(err["message"]) <= 1000

    fuzz()
    assert http(server.url + "/health")[0] == 200
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen
    r = post_json(server.url + "/v1/completions", {"prompt": "Say\n", "max_tokens": 64, "temperature": 0})
    assert r[0] == 200 and r[1]["choices"][0]["text"] == SCRIPT_TEXT


# ---- the splitter on scripted text --------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_reasoning_splitter_on_pieces(cut):
    for thinking, text, want in [
        (True, "Let me think.\n</think>\n\nThe answer.", ("Let me think.\n", "The answer.")),
        (False, "  <think>\nhmm</think>ok", ("hmm", "ok")),  # the reply itself opens <think>
        (False, "<thin ok", (None, "<thin ok")),  # not a tag after all
        (False, "plain answer </think> kept", (None, "plain answer </think> kept")),  # a model that never thinks
        (True, "still thinking <", ("still thinking <", "")),  # cut off before </think>
    ]:
        s = ReasoningSplitter(thinking)
        r = c = ""
        for i in range(0, len(text), cut):
            a, b = s.push(text[i : i + cut])
            r, c = r + a, c + b
        a, b = s.finish()
        r, c = r + a, c + b
        assert ((r if s.reasoned else None), c) == want == split_reasoning(text, thinking)


def test_sigterm_lets_running_requests_finish_and_exits_0(checkpoint, tmp_path):
    srv = ServerProcess(str(checkpoint), "--plain", "--max-model-len", "1024", "--shutdown-timeout", "60",
                        log=tmp_path / "server.log").wait_ready()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        stream = client.completions.create(model=name, prompt="Say\n", max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        pieces, finish = [], None
        for i, chunk in enumerate(stream):
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            if i == 2:
                srv.proc.send_signal(15)
        assert finish == "length" and "".join(pieces).startswith(SCRIPT_TEXT)
        assert srv.proc.wait(60) == 0
        with pytest.raises(OSError):
            http(srv.url + "/health", timeout=2)
    finally:
        srv.terminate()


def test_cli_help_and_bad_arguments(tmp_path):
    import subprocess
    import sys

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "seekwen", "serve", *args], capture_output=True, text=True,
                              timeout=120)

    r = serve("--help")
    assert r.returncode == 0
    for flag in ("--host", "--port", "--api-key", "--max-batch", "--max-model-len", "--max-queue",
                 "--served-model-name", "--dtype", "--device", "--quantize", "--max-body-bytes", "127.0.0.1"):
        assert flag in r.stdout
    for args, needle in [(["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch"),
                         (["--max-queue", "0"], "--max-queue"), ([str(tmp_path / "missing")], "missing")]:
        r = serve(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1

"""`seekwen serve` on the bundled model, as a real process on a loopback port, driven by the official `openai`
client (and raw HTTP for what a client library would not send): completions and chat, streaming and not,
stop strings, seeds, usage == /tokenize, n > 1, logprobs, batched == alone, 32 concurrent streams with a
quarter disconnecting, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import pytest
from serve_util import ServerProcess, http, metric, post_json

from seekwen.tools.common import bundled_model_path

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not (bundled_model_path() / "model.safetensors").is_file(),
                                reason="bundled model not built")

KEY = "test-key-123"
NAME = "kjv"
GREEDY = dict(temperature=0, max_tokens=24, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = ServerProcess("--served-model-name", NAME, "other-name", "--api-key", KEY, "--max-batch", "8",
                        "--max-queue", "64", "--max-body-bytes", "65536", log=log)
    try:
        yield srv.wait_ready()
    finally:
        code = srv.terminate()
        assert code == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def tokenize(server, **body) -> list[int]:
    status, out = post_json(server.url + "/tokenize", {"model": NAME, **body}, auth())
    assert status == 200, out
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 256
    return out["tokens"]


def test_models_health_openapi(server, client):
    assert [m.id for m in client.models.list().data] == [NAME, "other-name"]
    assert http(server.url + "/health")[0] == 200
    status, raw = http(server.url + "/openapi.json")
    paths = json.loads(raw)["paths"]
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= set(paths)
    status, out = post_json(server.url + "/detokenize", {"tokens": tokenize(server, prompt="And God said")}, auth())
    assert status == 200 and out["prompt"].endswith("And God said")


def test_completions_prompt_forms_and_usage(server, client):
    ids = tokenize(server, prompt="In the beginning")
    a = client.completions.create(model=NAME, prompt="In the beginning", **GREEDY)
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens == 24
    assert a.usage.total_tokens == len(ids) + 24 and a.choices[0].finish_reason == "length"
    assert a.object == "text_completion" and a.model == NAME and a.choices[0].text
    b = client.completions.create(model="other-name", prompt=ids, **GREEDY)  # token ids: the same text
    assert b.choices[0].text == a.choices[0].text and b.model == NAME
    c = client.completions.create(model=NAME, prompt=["In the beginning", "And God said"], **GREEDY)
    assert [ch.index for ch in c.choices] == [0, 1] and c.choices[0].text == a.choices[0].text
    assert c.usage.prompt_tokens == len(ids) + len(tokenize(server, prompt="And God said"))
    d = client.completions.create(model=NAME, prompt=[ids, ids[:2]], **GREEDY)
    assert d.choices[0].text == a.choices[0].text and len(d.choices) == 2
    e = client.completions.create(model=NAME, prompt="In the beginning", echo=True, **GREEDY)
    assert e.choices[0].text.endswith("In the beginning" + a.choices[0].text)


def test_completions_streaming_equals_non_streaming(client):
    ref = client.completions.create(model=NAME, prompt="The LORD is my shepherd", **GREEDY)
    chunks = list(client.completions.create(model=NAME, prompt="The LORD is my shepherd", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens


def test_chat_streaming_and_not(server, client):
    messages = [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "Who made the heaven?"}]
    ref = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    msg = ref.choices[0].message
    assert msg.role == "assistant" and msg.content and getattr(msg, "reasoning_content", None) is None
    assert ref.usage.prompt_tokens == len(tokenize(server, messages=messages))
    assert ref.usage.completion_tokens == 24 and ref.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.total_tokens == ref.usage.total_tokens
    # max_completion_tokens is the newer name of max_tokens
    short = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_completion_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_stop_strings_single_and_multi_token(client):
    ref = client.completions.create(model=NAME, prompt="And God said", logprobs=0, **GREEDY)
    text = ref.choices[0].text
    toks = ref.choices[0].logprobs.tokens
    assert "".join(toks) == text
    offsets = ref.choices[0].logprobs.text_offset
    single = toks[6]  # one whole token (with its leading space, if any)
    cut = offsets[8]
    multi = text[cut - 2 : cut + 3]  # ends one token, starts the next
    for stop in (single, multi):
        want = text[: text.index(stop)]
        got = client.completions.create(model=NAME, prompt="And God said", stop=[stop, "qqqq"], **GREEDY)
        assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
        assert got.choices[0].model_extra["stop_reason"] == stop
        chunks = list(client.completions.create(model=NAME, prompt="And God said", stop=stop, stream=True, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert got.usage.completion_tokens < 24


def test_seeds_and_n(client):
    kw = dict(model=NAME, prompt="In the beginning", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c
    many = client.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    texts = [ch.text for ch in many.choices]
    assert texts[0] == a and len(set(texts)) == 3  # sample i draws from seed + i
    assert many.usage.completion_tokens == 48
    again = client.completions.create(seed=7, n=3, **kw)
    assert [ch.text for ch in again.choices] == texts
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], n=2, seed=3,
                                          max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 16


def test_logprobs(client):
    r = client.completions.create(model=NAME, prompt="In the beginning", logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
        assert math.isclose(max(top.values()), chosen, abs_tol=1e-5)  # greedy takes the most likely
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                       top_logprobs=2, **GREEDY)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert "".join(t.token for t in content).strip().startswith(c.choices[0].message.content[:5])
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1 + 1e-5
    sampled = client.completions.create(model=NAME, prompt="In the beginning", logprobs=2, max_tokens=8, seed=1,
                                        temperature=1.0)
    assert all(v <= 0 for v in sampled.choices[0].logprobs.token_logprobs)


def test_echo_with_prompt_logprobs(server, client):
    ids = tokenize(server, prompt="In the beginning God")
    r = client.completions.create(model=NAME, prompt=ids, echo=True, logprobs=2, max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    # prompt position 2 is scored as the first token after the prompt's first two tokens would be
    head = client.completions.create(model=NAME, prompt=ids[:2], logprobs=2, max_tokens=1, temperature=0)
    want = head.choices[0].logprobs.top_logprobs[0]
    assert lp.top_logprobs[2].keys() == want.keys()
    assert all(math.isclose(lp.top_logprobs[2][k], want[k], abs_tol=1e-4) for k in want)


PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are", "Let there be light",
           "And it came to pass", "Thus saith the LORD", "For God so loved"]


def test_batched_equals_alone(client):
    kw = dict(model=NAME, temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
    together: dict[int, str] = {}

    def one(i):
        together[i] = client.completions.create(prompt=PROMPTS[i], **kw).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [together[i] for i in range(len(PROMPTS))] == alone


@pytest.mark.slow
def test_32_streams_a_quarter_disconnect(server, client):
    kw = dict(model=NAME, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    ref = {p: client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS[:4]}
    before = http(server.url + "/metrics")[1].decode()
    aborts0 = metric(before, "seekwen_request_success_total", finished_reason="abort")

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i):
            prompt = PROMPTS[i % 4]
            stream = await aclient.completions.create(prompt=prompt, stream=True, **kw)
            text, n, finish = "", 0, None
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
                n += 1
                if i % 4 == 3 and n == 3:  # a quarter hang up mid-stream
                    await stream.close()
                    return None
            return prompt, text, finish

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), 240)
        finally:
            await aclient.close()

    results = asyncio.run(main())
    done = [r for r in results if r is not None]
    assert len(done) == 24
    for prompt, text, finish in done:
        assert text == ref[prompt] and finish == "length"
    text = ""
    for _ in range(100):  # the aborts reach the engine thread within a step or two
        text = http(server.url + "/metrics")[1].decode()
        if metric(text, "seekwen_num_requests_running") == 0 and metric(text, "seekwen_num_requests_waiting") == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metric(text, "seekwen_num_requests_running") == 0
    assert metric(text, "seekwen_num_requests_waiting") == 0
    assert metric(text, "seekwen_kv_cache_tokens") == 0 and metric(text, "seekwen_kv_cache_usage_perc") == 0
    assert metric(text, "seekwen_request_success_total", finished_reason="abort") - aborts0 == 8
    assert metric(text, "seekwen_time_to_first_token_seconds_count") >= 32
    assert client.completions.create(prompt="In the beginning", **kw).choices[0].text == ref["In the beginning"]


# ---- errors ---------------------------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [5, 4096]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"max_tokens": 250, "prompt": "word " * 10}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"seed": 2**70}, "seed"),
    ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
]


@pytest.mark.parametrize("fields,param", BAD_COMPLETIONS, ids=[p + str(i) for i, (_, p) in enumerate(BAD_COMPLETIONS)])
def test_invalid_fields_are_400(server, fields, param):
    body = {"model": NAME, "prompt": "In the beginning", "max_tokens": 4, **fields}
    status, out = post_json(server.url + "/v1/completions", body, auth())
    assert status == 400, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and len(err["message"]) < 1000
    if param == "max_tokens" and fields.get("max_tokens") == 250:
        assert all(str(n) in err["message"] for n in (256, 250, len(tokenize(server, prompt="word " * 10))))


BAD_CHAT = [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
]


@pytest.mark.parametrize("fields,param", BAD_CHAT, ids=[p + str(i) for i, (_, p) in enumerate(BAD_CHAT)])
def test_invalid_chat_fields_are_400(server, fields, param):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    status, out = post_json(server.url + "/v1/chat/completions", body, auth())
    assert status == 400 and out["error"]["param"] == param, out


def test_auth_model_body_errors(server, client):
    url = server.url + "/v1/completions"
    body = json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 2})
    ct = {"Content-Type": "application/json"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        status, raw = http(url, "POST", body, {**ct, **headers})
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert http(server.url + "/v1/models")[0] == 401
    assert http(server.url + "/health")[0] == 200 and http(server.url + "/metrics")[0] == 200  # open, as vLLM
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    hdr = {**ct, **auth()}
    for raw_body in (b"[1, 2]", b"null", b"42", b'"text"', b"{", b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000,
                     b'{"prompt": "x", "max_tokens": NaN}', b'{"prompt": "x", "temperature": Infinity}'):
        status, raw = http(url, "POST", raw_body, hdr)
        assert 400 <= status < 500 and "error" in json.loads(raw), raw_body[:20]
    status, raw = http(url, "POST", body, {"Content-Type": "text/plain", **auth()})
    assert 400 <= status < 500
    status, raw = http(url, "POST", json.dumps({"prompt": "x" * 70000}), hdr)  # over --max-body-bytes 65536
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    status, raw = http(server.url + "/v1/nothing", "GET", headers=auth())
    assert status == 404 and "error" in json.loads(raw)
    assert 400 <= http(url, "GET", headers=auth())[0] < 500
    # and the server is still fine
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens <= 2

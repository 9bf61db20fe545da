"""`seekwen serve --paged`: the server on the block-paged engine (prefix caching, chunked prefill), as a real
process on a loopback port driven by the official client: greedy text equals the model's own greedy
generation, a shared prefix shows up as prefix-cache hits in /metrics, and after streams that hang up
midway nothing is left running or holding blocks."""

from __future__ import annotations

import asyncio

import pytest
from serve_util import greedy_reference, http, metric, post_json, serving

from seekwen.tools.common import bundled_model_path

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not (bundled_model_path() / "model.safetensors").is_file(),
                                reason="bundled model not built")

NAME = "kjv"
PREFIX = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
          "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. ")
PROMPTS = [PREFIX + tail for tail in ("And God said", "And the evening", "And God called", "And God made")]
N = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-paged") / "server.log"
    with serving("--served-model-name", NAME, "--paged", "--max-batch", "4", log=log) as srv:
        yield srv


def test_paged_server_greedy_equals_generate_and_reuses_the_prefix(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = dict(model=NAME, temperature=0, max_tokens=N, extra_body={"ignore_eos": True})
    texts = [client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]  # one after another
    assert texts == [greedy_reference(server, NAME, p, N) for p in PROMPTS]
    text = http(server.url + "/metrics")[1].decode()
    assert metric(text, "seekwen_prefix_cache_hit_rate") > 0  # the later prompts found the shared prefix


def test_paged_server_streams_with_disconnects_leave_nothing_held(server):
    kw = dict(model=NAME, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(i):
            stream = await aclient.completions.create(prompt=PROMPTS[i % 4], stream=True, **kw)
            n = 0
            async for _ in stream:
                n += 1
                if i % 4 == 3 and n == 3:  # a quarter hang up mid-stream
                    await stream.close()
                    return None
            return n

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(12))), 240)
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert sum(r is not None for r in results) == 9
    text = ""
    for _ in range(100):  # the aborts reach the engine thread within a step or two
        text = http(server.url + "/metrics")[1].decode()
        if metric(text, "seekwen_num_requests_running") == 0 and metric(text, "seekwen_kv_cache_tokens") == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metric(text, "seekwen_num_requests_running") == 0
    assert metric(text, "seekwen_num_requests_waiting") == 0
    assert metric(text, "seekwen_kv_cache_tokens") == 0  # no block referenced (cached prefixes are evictable)
    r = post_json(server.url + "/v1/completions", {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4,
                                                   "temperature": 0})
    assert r[0] == 200 and r[1]["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("argv, want", [
    ([], dict(paged=True, block_size=16, num_blocks=None, max_num_batched_tokens=512, enable_prefix_caching=True)),
    (["--block-size", "8", "--num-blocks", "100", "--max-num-batched-tokens", "16", "--no-enable-prefix-caching"],
     dict(paged=True, block_size=8, num_blocks=100, max_num_batched_tokens=16, enable_prefix_caching=False)),
    (["--engine", "rows"], {}),
    (["--speculative", "mtp"], {}),  # mtp runs on the row pool: the default follows it
    (["--speculative", "ngram"], dict(paged=True, block_size=16, num_blocks=None, max_num_batched_tokens=512,
                                      enable_prefix_caching=True)),
])
def test_serve_engine_flags(argv, want):
    """`seekwen serve` serves from the paged engine unless told (or unless the speculation needs the row
    pool); its cache and budget flags reach the Engine."""
    from seekwen.cli import build_parser
    from seekwen.tools.serve import check_args, engine_kwargs

    args = build_parser().parse_args(["serve", *argv])
    check_args(args)
    assert engine_kwargs(args) == want


@pytest.mark.parametrize("argv, message", [
    (["--block-size", "0"], "--block-size must be >= 1"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
    (["--num-blocks", "0"], "--num-blocks must be >= 1"),
    (["--engine", "paged", "--speculative", "draft", "--draft-model", "x"], "ngram only"),
])
def test_serve_engine_flag_errors(argv, message):
    from seekwen.cli import build_parser
    from seekwen.errors import UserError
    from seekwen.tools.serve import check_args

    with pytest.raises(UserError, match=message):
        check_args(build_parser().parse_args(["serve", *argv]))

"""The batched engine gives each request exactly what per-sequence `model.generate` gives (greedy),
while requests of different lengths join and leave a smaller slot pool; stops, streaming, per-row
sampling parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import seekwen
from seekwen.fast import prepare
from seekwen.runtime.engine import Engine, SamplingParams

LENS = [5, 17, 9, 3, 12, 20, 7]
MAX_NEW = [6, 10, 3, 12, 8, 5, 9]


@pytest.fixture(scope="module", params=["qwen2_sliding", "deepseek_v2", "qwen3_moe"])
def model(request, hub_checkpoint):
    _, folder = hub_checkpoint(request.param)
    return seekwen.load(folder, dtype=torch.float32, fast=False)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENS]


def _reference(model, prompts, max_new) -> list[list[int]]:
    return [
        model.generate(torch.tensor([p]), max_new_tokens=n, stop_at_eos=False, eos_token_id=[])[0].tolist()
        for p, n in zip(prompts, max_new, strict=True)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True])
def test_engine_equals_per_sequence_generate(model, fast):
    prompts = _prompts(model.cfg.vocab_size)
    ref = _reference(model, prompts, MAX_NEW)
    m = prepare(copy.deepcopy(model)) if fast else model
    engine = Engine(m, max_batch=3, max_len=40)  # 7 requests through 3 rows: joins and leaves
    out = engine.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in MAX_NEW])
    assert out == ref
    assert not engine.has_work() and engine.decoder.lens.shape[0] == 3


def test_engine_stops_and_streaming(model):
    prompts = _prompts(model.cfg.vocab_size, seed=1)[:3]
    ref = _reference(model, prompts, [8, 8, 8])
    engine = Engine(model, max_batch=4, max_len=40)
    stop_tok = ref[0][3]
    streamed: dict[int, list[int]] = {}

    def on_token(ev):
        streamed.setdefault(ev.id, []).append(ev.token)

    ids = [
        engine.add_request(prompts[0], SamplingParams(max_tokens=8, stop_token_ids=[stop_tok], ignore_eos=True),
                           on_token=on_token),
        engine.add_request(prompts[1], SamplingParams(max_tokens=5, ignore_eos=True), on_token=on_token),
        engine.add_request(prompts[2], SamplingParams(max_tokens=8, ignore_eos=True), on_token=on_token),
    ]
    events = list(engine.stream())
    first_stop = ref[0].index(stop_tok)
    assert streamed[ids[0]] == ref[0][: first_stop + 1]
    assert streamed[ids[1]] == ref[1][:5]
    assert streamed[ids[2]] == ref[2]
    reasons = {e.id: e.reason for e in events if e.finished}
    assert reasons == {ids[0]: "stop", ids[1]: "length", ids[2]: "length"}
    assert sum(e.finished for e in events) == 3


def test_engine_eos(model):
    prompts = _prompts(model.cfg.vocab_size, seed=2)[:2]
    ref = _reference(model, prompts, [10, 10])
    engine = Engine(model, max_batch=2, max_len=40)
    engine.eos = {ref[0][2]}  # pretend the config's EOS is the 3rd greedy token of request 0
    out = engine.generate(prompts, SamplingParams(max_tokens=10))
    assert out[0] == ref[0][: ref[0].index(ref[0][2]) + 1]


def test_engine_per_row_sampling(model):
    """Greedy rows stay greedy next to sampled rows; a seeded engine is reproducible."""
    prompts = _prompts(model.cfg.vocab_size, seed=3)[:4]
    ref = _reference(model, prompts, [6] * 4)
    params = [SamplingParams(max_tokens=6, ignore_eos=True, temperature=t, top_k=k, top_p=p)
              for t, k, p in [(0.0, 0, 1.0), (1.0, 5, 1.0), (0.0, 0, 1.0), (0.8, 0, 0.9)]]
    a = Engine(model, max_batch=4, max_len=40, seed=7).generate(prompts, params)
    b = Engine(model, max_batch=4, max_len=40, seed=7).generate(prompts, params)
    assert a == b
    assert a[0] == ref[0] and a[2] == ref[2]
    assert all(len(x) == 6 for x in a)


@pytest.mark.slow
def test_seeded_request_independent_of_batch(model):
    """A request with its own seed samples the same text alone, in a full batch, or in another seat."""
    prompts = _prompts(model.cfg.vocab_size, seed=4)[:4]
    mine = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, top_k=20, seed=11)
    others = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.9) for n in (3, 8, 5)]
    alone = Engine(model, max_batch=4, max_len=40).generate([prompts[0]], [mine])[0]
    first = Engine(model, max_batch=4, max_len=40, seed=1).generate(prompts, [mine] + others)[0]
    last = Engine(model, max_batch=2, max_len=40, seed=2).generate(prompts[1:] + prompts[:1], others + [mine])[-1]
    assert alone == first == last
    seeds = [SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, top_k=20, seed=s) for s in (1, 2, 3)]
    outs = Engine(model, max_batch=3, max_len=40).generate([prompts[0]] * 3, seeds)
    assert len({tuple(o) for o in outs}) > 1  # the seed matters


def test_engine_rejects_bad_requests(model):
    engine = Engine(model, max_batch=2, max_len=16)
    with pytest.raises(ValueError):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request([1] * 10, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError):
        engine.add_request([model.cfg.vocab_size], SamplingParams(max_tokens=1))

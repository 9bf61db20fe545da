"""Speculative decoding inside the batching `Engine` (runtime/engine.py `_decode_speculative`): with
staggered requests, rows retired and moved, per-request limits and stops, the greedy output of every
proposer equals the plain engine's token for token; logprobs are the plain engine's; penalised rows and
seeded sampled rows keep their meaning; the draft and MTP caches follow their rows."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import SPECS, make_checkpoint
from test_speculative import MTP_SPEC, _add_mtp_layer

import seekwen
from seekwen.fast import prepare
from seekwen.runtime.engine import Engine, SamplingParams
from seekwen.runtime.load import bundled_model_path


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """Prompts made of a repeated random phrase (prompt lookup finds matches), of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        phrase = torch.randint(3, vocab, (4 + i % 3,), generator=g).tolist()
        out.append((phrase * 8)[: 9 + 3 * i])
    return out


def _run(engine: Engine, prompts, params, stagger: int = 2) -> list[list[int]]:
    """Requests join `stagger` steps apart (so drafting rows and prefilling rows share steps); outputs."""
    ids, pending = [], list(zip(prompts, params, strict=True))
    while pending or engine.has_work():
        if pending and (not ids or engine.stats.steps % stagger == 0):
            p, sp = pending.pop(0)
            ids.append(engine.add_request(p, sp))
        engine.step()
    return [engine.finished[i].output for i in ids]


def _pair(model, prompts, params, **spec) -> tuple[list[list[int]], list[list[int]], Engine]:
    plain = _run(Engine(model, max_batch=3, max_len=96), prompts, params)
    engine = Engine(model, max_batch=3, max_len=96, **spec)
    return plain, _run(engine, prompts, params), engine


@pytest.mark.parametrize("name", sorted(SPECS))
def test_engine_greedy_ngram_equals_plain_engine(models, name):
    model = models(name)
    prompts = _prompts(model.cfg.vocab_size, 5)
    params = [SamplingParams(max_tokens=10 + 3 * i, ignore_eos=True) for i in range(5)]
    plain, spec, engine = _pair(model, prompts, params, speculative="ngram", num_speculative_tokens=3)
    assert spec == plain
    st = engine.spec_stats
    assert sum(st.proposed) > 0 and st.forwards > 0
    assert st.tokens_per_forward() >= 1.0


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    _, folder = make_checkpoint(MTP_SPEC, tmp_path_factory.mktemp("mtp"))
    _add_mtp_layer(folder)
    return seekwen.load(folder, dtype=torch.float32, fast=False)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_engine_greedy_mtp_equals_plain_engine(mtp_model, fast):
    model = prepare(copy.deepcopy(mtp_model)) if fast else mtp_model
    prompts = _prompts(model.cfg.vocab_size, 5, seed=1)
    params = [SamplingParams(max_tokens=8 + 4 * i, ignore_eos=True) for i in range(5)]
    plain, spec, engine = _pair(model, prompts, params, speculative="mtp", num_speculative_tokens=2)
    assert spec == plain
    assert len(engine.spec_stats.proposed) == 2


def test_engine_greedy_draft_model_equals_plain_engine(models):
    target, draft = models("qwen2"), models("qwen3")  # same vocabulary size: any ids are valid drafts
    prompts = _prompts(target.cfg.vocab_size, 5, seed=2)
    params = [SamplingParams(max_tokens=9 + 2 * i, ignore_eos=True) for i in range(5)]
    plain, spec, _ = _pair(target, prompts, params, speculative="draft", draft_model=draft, num_speculative_tokens=3)
    assert spec == plain


def test_engine_speculation_with_a_draft_that_is_the_target_accepts_everything(models):
    model = models("qwen2")
    prompts = _prompts(model.cfg.vocab_size, 3, seed=3)
    params = [SamplingParams(max_tokens=13, ignore_eos=True)] * 3
    plain, spec, engine = _pair(model, prompts, params, speculative="draft", draft_model=model,
                                num_speculative_tokens=3)
    assert spec == plain
    assert engine.spec_stats.acceptance() == [1.0, 1.0, 1.0]
    assert engine.spec_stats.tokens_per_forward() > 3.0


def test_engine_speculation_stops_logprobs_and_penalties(models):
    """A stop token inside an accepted run ends the request there; logprobs of every token equal the
    plain engine's; a penalised row gets no drafts and decodes exactly as without speculation."""
    model = models("qwen3")
    prompts = _prompts(model.cfg.vocab_size, 3, seed=4)
    ref = _run(Engine(model, max_batch=3, max_len=96), prompts, [SamplingParams(max_tokens=16, ignore_eos=True)] * 3)
    stop = ref[0][7]  # a token the first request emits mid-way
    params = [SamplingParams(max_tokens=16, ignore_eos=True, stop_token_ids=[stop], logprobs=2),
              SamplingParams(max_tokens=16, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5),
              SamplingParams(max_tokens=16, ignore_eos=True, logprobs=0)]

    def run(**spec):
        engine = Engine(model, max_batch=3, max_len=96, **spec)
        events: dict[int, list] = {}
        ids = [engine.add_request(p, sp, on_token=lambda ev: events.setdefault(ev.id, []).append(ev))
               for p, sp in zip(prompts, params, strict=True)]
        while engine.has_work():
            engine.step()
        return [engine.finished[i] for i in ids], [events[i] for i in ids]

    (plain_reqs, plain_ev), (spec_reqs, spec_ev) = run(), run(speculative="ngram", num_speculative_tokens=4)
    for a, b in zip(plain_reqs, spec_reqs, strict=True):
        assert a.output == b.output and a.reason == b.reason and a.stop_reason == b.stop_reason
    assert spec_reqs[0].reason == "stop" and spec_reqs[0].output[-1] == stop
    for ea, eb in zip(plain_ev, spec_ev, strict=True):
        assert [e.token for e in ea] == [e.token for e in eb]
        for x, y in zip(ea, eb, strict=True):
            if x.logprob is not None:
                assert abs(x.logprob - y.logprob) < 1e-4
                assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]


def test_engine_speculation_seeded_sample_does_not_depend_on_batch_mates(models):
    model = models("qwen2")
    prompts = _prompts(model.cfg.vocab_size, 3, seed=5)
    seeded = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, seed=123, ignore_eos=True)
    other = SamplingParams(max_tokens=14, temperature=1.0, ignore_eos=True)

    def alone_and_batched(**spec):
        alone = Engine(model, max_batch=3, max_len=96, seed=0, **spec).generate([prompts[0]], [seeded])[0]
        batched = Engine(model, max_batch=3, max_len=96, seed=7, **spec).generate(prompts, [seeded, other, other])[0]
        return alone, batched

    alone, batched = alone_and_batched(speculative="ngram", num_speculative_tokens=3)
    assert alone == batched
    alone, batched = alone_and_batched(speculative="draft", draft_model=models("qwen3"), num_speculative_tokens=2)
    assert alone == batched


def test_engine_speculation_abort_and_errors(models):
    model = models("qwen2")
    engine = Engine(model, max_batch=2, max_len=64, speculative="ngram")
    prompts = _prompts(model.cfg.vocab_size, 3, seed=6)
    ids = [engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in prompts]
    engine.step()
    engine.step()
    assert engine.abort(ids[0])
    while engine.has_work():
        engine.step()
    assert engine.finished[ids[0]].reason == "abort"
    assert all(len(engine.finished[i].output) == 20 for i in ids[1:])
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        Engine(model, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="MTP|multi-token"):
        Engine(model, speculative="mtp")


def test_engine_speculation_stop_string_on_the_bundled_model():
    """Stop strings are decided on the detokenized text also inside an accepted run."""
    model = seekwen.load(bundled_model_path(), dtype=torch.float32)
    prompt = model.tokenizer.encode("And God said, Let there be light: and there was light. And God said, Let")
    plain = Engine(model, max_batch=2, max_len=128).generate([prompt], [SamplingParams(max_tokens=30)])[0]
    text = model.tokenizer.decode(plain)
    stop = text.split()[3]  # a word the plain run writes
    p = SamplingParams(max_tokens=30, stop=[stop])
    a = Engine(model, max_batch=2, max_len=128)
    b = Engine(model, max_batch=2, max_len=128, speculative="ngram", num_speculative_tokens=4)
    ra, rb = a.add_request(prompt, p), b.add_request(prompt, p)
    for e in (a, b):
        while e.has_work():
            e.step()
    x, y = a.finished[ra], b.finished[rb]
    assert (x.output, x.text, x.reason, x.stop_reason) == (y.output, y.text, y.reason, y.stop_reason)
    assert y.reason == "stop" and stop not in y.text


# ---- the paged engine: drafts verified through the block tables, rejected ones rolled back ----------

PAGED = {
    "prefix": dict(block_size=4),
    "chunked": dict(block_size=4, max_num_batched_tokens=6, enable_prefix_caching=False),
    "preempt": dict(block_size=4, num_blocks=14, max_num_batched_tokens=8),
}


def _paged_drained(engine: Engine) -> None:
    s = engine.cache_stats()
    assert s["blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0
    for m in engine.paged.scheduler.managers:
        m.check()


CASES = [(name, "prefix") for name in sorted(SPECS)] + [
    (name, config) for name in ("deepseek_v2", "qwen2_sliding", "qwen3_moe") for config in ("chunked", "preempt")]


@pytest.mark.parametrize("name, config", CASES)
def test_paged_engine_greedy_ngram_equals_plain(models, name, config):
    """Drafts ride in the scheduler's token budget, are verified in one forward through the block tables
    and the rejected ones' keys and blocks are given back (`Scheduler.rollback`): the same tokens as the
    row-pool engine without speculation, under chunked prefill and forced preemption, blocks all back."""
    model = models(name)
    prompts = _prompts(model.cfg.vocab_size, 5, seed=7)
    params = [SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True) for i in range(5)]
    plain = _run(Engine(model, max_batch=3, max_len=64), prompts, params)
    engine = Engine(model, max_batch=3, max_len=64, paged=True, speculative="ngram", num_speculative_tokens=3,
                    **PAGED[config])
    assert _run(engine, prompts, params) == plain
    _paged_drained(engine)
    assert sum(engine.spec_stats.accepted) > 0
    assert sum(engine.spec_stats.accepted) < sum(engine.spec_stats.proposed)  # rejections were rolled back
    if config == "preempt":
        assert engine.cache_stats()["preemptions"] > 0


def test_paged_rollback_returns_blocks_past_the_kept_tokens(models):
    from seekwen.runtime.paged import PagedKVCache
    from seekwen.runtime.scheduler import Scheduler, Sequence

    model = models("qwen2")
    cache = PagedKVCache(model.cfg, 8, block_size=4)
    sched = Scheduler(cache.groups, 4, 2, 64)

    class Req:
        id, prompt, output = 0, list(range(3, 9)), []

    seq = Sequence(Req())
    sched.add(seq)
    sched.schedule()
    seq.n_computed = 6
    sched._grow(seq, 15)  # as if 9 speculative tokens were planned: 4 blocks
    seq.n_computed = 15
    assert len(seq.tables[0]) == 4 and sched.managers[0].num_free() == 4
    sched.rollback(seq, 7)
    assert len(seq.tables[0]) == 2 and sched.managers[0].num_free() == 6
    with pytest.raises(ValueError):
        sched.rollback(seq, 9)
    sched.finish(seq)
    assert sched.managers[0].num_free() == 8


def test_paged_engine_speculation_only_with_ngram(models):
    with pytest.raises(ValueError, match="ngram"):
        Engine(models("qwen2"), paged=True, speculative="draft", draft_model=models("qwen3"))

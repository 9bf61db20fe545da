"""The paged engine (block-paged KV cache, scheduler, prefix caching) gives each request exactly what
per-sequence `model.generate` gives (greedy), for every family, with prefix sharing on and off, under
forced preemption, with aborts and with chunked prefill; blocks all come back; the block manager keeps
its invariants; the fast path equals the plain one."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hf_models import SPECS, Spec, make_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import seekwen
from seekwen.fast import prepare
from seekwen.runtime import paged_engine
from seekwen.runtime.blocks import BlockManager, chain_hashes
from seekwen.runtime.engine import Engine, SamplingParams
from seekwen.runtime.scheduler import QueueFull

LENS = [5, 17, 9, 3, 12, 20, 7]
MAX_NEW = [6, 10, 3, 12, 8, 5, 9]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Mixed lengths; two prompts share a 16-token prefix with prompt 1, one repeats prompt 2."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENS]
    ps[3] = ps[1][:16] + ps[3]
    ps[5] = ps[1][:12] + ps[5][:8]
    ps[6] = list(ps[2])
    return ps


def _reference(model, prompts, max_new) -> list[list[int]]:
    return [
        model.generate(torch.tensor([p]), max_new_tokens=n, stop_at_eos=False, eos_token_id=[])[0].tolist()
        for p, n in zip(prompts, max_new, strict=True)
    ]


def _params(max_new):
    return [SamplingParams(max_tokens=n, ignore_eos=True) for n in max_new]


def _drained(engine: Engine) -> None:
    s = engine.cache_stats()
    assert s["blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0 and s["kv_bytes_held"] == 0
    for m in engine.paged.scheduler.managers:
        m.check()


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, tmp_path_factory):
    spec = SPECS[request.param]
    _, folder = make_checkpoint(spec, tmp_path_factory.mktemp(spec.name))
    model = seekwen.load(folder, dtype=torch.float32)
    prompts = _prompts(model.cfg.vocab_size)
    return model, prompts, _reference(model, prompts, MAX_NEW)


# (name, Engine kwargs): prefix sharing on / off, chunked prefill (budget 8 tokens a step), forced
# preemption (a block budget far below the requests' needs)
CONFIGS = {
    "prefix": dict(block_size=4),
    "no_prefix_chunked": dict(block_size=4, enable_prefix_caching=False, max_num_batched_tokens=8),
    "preempt": dict(block_size=4, num_blocks=10, max_num_batched_tokens=8),
    "preempt_no_prefix": dict(block_size=2, num_blocks=16, enable_prefix_caching=False),
}


@pytest.fixture(params=["flat", "split"])
def calls(request, monkeypatch):
    """How the runner computes a step: "flat", every token a one-token row of one forward call (the
    default for small steps), or "split", decode rows and right-padded prefill chunks in separate calls
    (the default for large steps): both must give the same tokens."""
    if request.param == "split":
        monkeypatch.setattr(paged_engine, "FLAT_MAX_TOKENS", 0)
    return request.param


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c == "preempt_no_prefix" else c
                                    for c in sorted(CONFIGS)])
def test_paged_engine_equals_generate(family, config, calls):
    model, prompts, ref = family
    engine = Engine(model, max_batch=3, max_len=40, paged=True, **CONFIGS[config])
    assert engine.generate(prompts, _params(MAX_NEW)) == ref
    _drained(engine)
    s = engine.cache_stats()
    if config.startswith("preempt"):
        assert s["preemptions"] > 0
    if config in ("prefix", "preempt"):
        assert s["prefix_hit_tokens"] > 0
    if "no_prefix" in config:
        assert s["prefix_hit_tokens"] == 0
    if not config.startswith("preempt"):  # every prompt token not found in the cache is prefilled once
        assert s["prefill_tokens"] == sum(len(p) for p in prompts) - s["prefix_hit_tokens"]
        assert s["tokens_computed"] == s["prefill_tokens"] + sum(MAX_NEW) - len(prompts)


def test_paged_fast_path_equals_plain(family, calls):
    model, prompts, ref = family
    fast = prepare(copy.deepcopy(model))
    for kw in (CONFIGS["no_prefix_chunked"], CONFIGS["preempt"]):
        engine = Engine(fast, max_batch=3, max_len=40, paged=True, **kw)
        assert engine.generate(prompts, _params(MAX_NEW)) == ref
        _drained(engine)


def test_abort_mid_way_frees_blocks(family):
    model, prompts, ref = family
    engine = Engine(model, max_batch=2, max_len=40, paged=True, block_size=4, max_num_batched_tokens=8)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, _params(MAX_NEW), strict=True)]
    out: dict[int, list[int]] = {}
    aborted = {ids[1], ids[4], ids[6]}  # running (mid-prefill or decoding), waiting
    step = 0
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.id, []).append(ev.token)
        step += 1
        if step == 3:
            assert engine.abort(ids[1]) and engine.abort(ids[6])
            assert engine.cache_stats()["blocks_used"] > 0
        if step == 6:
            assert engine.abort(ids[4])
    assert not engine.abort(ids[0])  # finished already
    for i, rid in enumerate(ids):
        if rid in aborted:
            assert engine.finished[rid].reason == "abort"
            assert out.get(rid, []) == ref[i][: len(out.get(rid, []))]
        else:
            assert out[rid] == ref[i]
    _drained(engine)
    assert engine.cache_stats()["aborted"] == 3


@pytest.mark.slow
def test_abort_everything_returns_all_blocks(family):
    model, prompts, _ = family
    engine = Engine(model, max_batch=3, max_len=40, paged=True, block_size=4, max_num_batched_tokens=8)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, _params(MAX_NEW), strict=True)]
    engine.step()
    engine.step()
    for rid in ids:
        engine.abort(rid)
    assert not engine.has_work()
    _drained(engine)


# ---- prefix caching: hits skip prefill; keys that depend on the length --------------------------------


@pytest.fixture(scope="module")
def bundled():
    from seekwen.tools.common import bundled_model_path

    return seekwen.load(bundled_model_path(), dtype=torch.float32)


def test_prefix_hit_skips_prefill(bundled):
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, bundled.cfg.vocab_size, (64,), generator=g).tolist()
    a, b = shared + [7, 8, 9], shared + [10, 11]
    ref = _reference(bundled, [a, b], [4, 4])
    engine = Engine(bundled, max_batch=2, max_len=128, paged=True, block_size=16)
    assert engine.generate([a], _params([4])) == ref[:1]
    before = engine.cache_stats()["prefill_tokens"]
    assert engine.generate([b], _params([4])) == ref[1:]
    s = engine.cache_stats()
    assert s["prefix_hit_tokens"] == 64  # 4 full blocks of the shared prefix
    assert s["prefill_tokens"] - before == len(b) - 64  # only the rest was prefilled
    # a prompt that is exactly cached still computes its last token (its logits are needed)
    engine.generate([shared], _params([2]))
    assert engine.cache_stats()["prefix_hit_tokens"] == 64 + 48


def test_n_samples_share_one_prompt_prefill(bundled):
    """n samples of one prompt queued together: the first prefills the prompt, the others wait for its
    blocks and prefill only the last partial block; each sample is still what the row pool gives
    (greedy: the reference; seeded: the same draws from seed + i)."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, bundled.cfg.vocab_size, (40,), generator=g).tolist()  # 2 full blocks + 8
    ref = _reference(bundled, [prompt], [5])[0]
    engine = Engine(bundled, max_batch=4, max_len=64, paged=True, block_size=16)
    ids = engine.add_samples(prompt, SamplingParams(max_tokens=5, ignore_eos=True), n=4)
    out = _run(engine, ids)
    assert all(out[i] == ref for i in ids)
    s = engine.cache_stats()
    assert s["prefill_tokens"] == 40 + 3 * 8 and s["prefix_hit_tokens"] == 3 * 32
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    rows = Engine(bundled, max_batch=4, max_len=64)
    want = _run(rows, rows.add_samples(prompt, sampled, n=3))
    paged = Engine(bundled, max_batch=4, max_len=64, paged=True, block_size=16)
    got = _run(paged, paged.add_samples(prompt, sampled, n=3))
    assert list(got.values()) == list(want.values()) and len(set(map(tuple, got.values()))) > 1
    _drained(paged)


def _run(engine: Engine, ids: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            out[ev.id].append(ev.token)
    return out


def test_qwen_v1_dynamic_ntk_prefix_cache_keyed_on_alpha(tmp_path):
    """Qwen v1 keys are rotated with the NTK alpha fixed from the prompt's length: a shared prefix is
    reused between prompts of one alpha, never across alphas, and every output equals generate."""
    from test_qwen_v1 import QWEN_V1, write_qwen_v1

    write_qwen_v1(tmp_path, dynamic=True, logn=True, seed=9)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    S = QWEN_V1["S"]  # seq_length 8: alpha 1 up to 8 tokens, 3 up to 16, 7 up to 32
    g = torch.Generator().manual_seed(6)
    base = torch.randint(0, QWEN_V1["V"], (2 * S + 4,), generator=g).tolist()
    prompts = [base[:S - 1], base[:S], base[:S + 3], base[:S + 6], base[: 2 * S + 4]]  # alphas 1, 1, 3, 3, 7
    ref = _reference(model, prompts, [9] * 5)
    for caching in (True, False):
        engine = Engine(model, max_batch=2, max_len=4 * S, paged=True, block_size=2,
                        enable_prefix_caching=caching)
        out = [engine.generate([p], _params([9]))[0] for p in prompts]  # one at a time: hits are deterministic
        assert out == ref
        s = engine.cache_stats()
        # hits: prompt 2 reuses prompt 1's 3 blocks (alpha 1), prompt 4 reuses prompt 3's 5 blocks (alpha 3)
        assert s["prefix_hit_tokens"] == ((3 + 5) * 2 if caching else 0)
    _drained(engine)


def test_hf_dynamic_rope_paged_equals_generate(tmp_path):
    """HF "dynamic" NTK: the base follows the call's length, so keys depend on the prompt length
    (prefix-cache salt) and on when each token was computed. The paged engine gives every token the
    rotation per-sequence generate gives it, even batched with longer sequences and chunked."""
    spec = Spec("qwen2_dynamic", "qwen2", dict(num_key_value_heads=2), rope={"type": "dynamic", "factor": 2.0})
    _, folder = make_checkpoint(spec, tmp_path)
    model = seekwen.load(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    base = torch.randint(3, 160, (40,), generator=g).tolist()
    prompts = [base[:36], base[:20], base[:30], base[:36] + [5], base[:12]]  # past max_pos = 32 and not
    ref = _reference(model, prompts, [8] * 5)
    for kw in (dict(block_size=4), dict(block_size=4, max_num_batched_tokens=8), dict(enable_prefix_caching=False)):
        engine = Engine(model, max_batch=3, max_len=64, paged=True, **kw)
        assert engine.generate(prompts, _params([8] * 5)) == ref
        _drained(engine)


# ---- scheduler limits ----------------------------------------------------------------------------------


def test_queue_bound_and_capacity(bundled):
    engine = Engine(bundled, max_batch=2, max_len=64, paged=True, block_size=16, num_blocks=4, max_queue=2)
    engine.add_request([5] * 10, SamplingParams(max_tokens=4))
    engine.add_request([5] * 10, SamplingParams(max_tokens=4))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.add_request([5] * 10, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        Engine(bundled, max_batch=2, max_len=128, paged=True, block_size=16, num_blocks=4).add_request(
            [5] * 60, SamplingParams(max_tokens=10))
    engine.generate([], None)
    while engine.has_work():
        engine.step()
    _drained(engine)


def test_chunked_prefill_keeps_decoding(bundled):
    """A long prompt joining running decodes is prefilled in chunks: every step still decodes them."""
    g = torch.Generator().manual_seed(2)
    short = [torch.randint(3, 1000, (6,), generator=g).tolist() for _ in range(3)]
    long = torch.randint(3, 1000, (200,), generator=g).tolist()
    ref = _reference(bundled, short + [long], [12, 12, 12, 3])
    engine = Engine(bundled, max_batch=4, max_len=256, paged=True, block_size=16, max_num_batched_tokens=32)
    ids = [engine.add_request(p, sp) for p, sp in zip(short, _params([12] * 3), strict=True)]
    engine.step()
    lid = engine.add_request(long, SamplingParams(max_tokens=3, ignore_eos=True))
    out: dict[int, list[int]] = {}
    tokens_per_step = []
    while engine.has_work():
        evs = engine.step()
        tokens_per_step.append(engine.cache_stats()["last_step_tokens"])
        for ev in evs:
            out.setdefault(ev.id, []).append(ev.token)
        if lid not in out:  # while the long prompt prefills, the short ones get a token every step
            assert {ev.id for ev in evs} == set(ids)
    assert [out[i] for i in ids] == [r[1:] for r in ref[:3]] and out[lid] == ref[3]
    assert max(tokens_per_step) <= 32


# ---- block manager invariants ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release", "publish", "share"]), st.integers(0, 1 << 16)),
                max_size=80))
def test_block_manager_invariants(ops):
    m = BlockManager(6)
    held: list[int] = []
    for op, x in ops:
        if op == "alloc" and m.num_free():
            held.append(m.allocate())
        elif op == "release" and held:
            m.release(held.pop(x % len(held)))
        elif op == "publish" and held:
            m.publish(held[x % len(held)], x.to_bytes(4, "little"))
        elif op == "share":
            b = m.lookup(x.to_bytes(4, "little"))
            if b is not None:
                m.acquire(b)
                held.append(b)
        m.check()
        assert m.num_used() == len(set(held))
        assert sorted(held) == sorted(b for b in range(6) for _ in range(m.ref[b]))
    for b in held:
        m.release(b)
    m.check()
    assert m.num_used() == 0


def test_chain_hash_is_a_prefix_hash():
    a = chain_hashes(list(range(10)), 4)
    b = chain_hashes(list(range(8)) + [99, 98, 97], 4)
    c = chain_hashes([1] + list(range(1, 10)), 4)
    assert len(a) == 2 and a == b[:2] and a[0] != c[0] and a[1] != c[1]
    assert chain_hashes(list(range(8)), 4, salt=3) != a


@pytest.mark.slow
def test_random_workload_returns_every_block(bundled):
    """Random prompts (shared prefixes), lengths, aborts, a small block budget: outputs equal generate,
    and the cache is empty at the end."""
    rnd = random.Random(0)
    base = [rnd.randrange(3, 1000) for _ in range(40)]
    prompts = [base[: rnd.randrange(1, 40)] + [rnd.randrange(3, 1000) for _ in range(rnd.randrange(0, 6))]
               for _ in range(7)]
    max_new = [rnd.randrange(1, 8) for _ in prompts]
    ref = _reference(bundled, prompts, max_new)
    engine = Engine(bundled, max_batch=4, max_len=64, paged=True, block_size=4, num_blocks=24,
                    max_num_batched_tokens=16)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, _params(max_new), strict=True)]
    out: dict[int, list[int]] = {}
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.id, []).append(ev.token)
        for mgr in engine.paged.scheduler.managers:
            mgr.check()
        if rnd.random() < 0.1:
            engine.abort(rnd.choice(ids))
    for i, rid in enumerate(ids):
        got = out.get(rid, [])
        if engine.finished[rid].reason == "abort":
            assert got == ref[i][: len(got)]
        else:
            assert got == ref[i]
    _drained(engine)


# ---- the paged decode kernel ----------------------------------------------------------------------------


@pytest.mark.parametrize("mla", [False, True])
def test_paged_attention_kernel_equals_reference(mla):
    from seekwen.fast import paged_kernels as pk

    kern = pk.get()
    if kern is None:
        pytest.skip("no C++ toolchain: the layers gather instead")
    g = torch.Generator().manual_seed(0)
    N, bs, B = 320, 4, 3
    G, Q, d1, d2 = (1, 8, 32, 8) if mla else (2, 3, 24, 0)
    k1 = torch.randn(N, bs, G, d1, generator=g)
    k2 = torch.randn(N, bs, G, d2, generator=g)
    v = k1 if mla else torch.randn(N, bs, G, 16, generator=g)
    table = torch.randperm(N, generator=g)[: B * 100].view(B, 100).int().contiguous()
    q1, q2 = torch.randn(B, G, Q, d1, generator=g), torch.randn(B, G, Q, d2, generator=g)
    start, count = [0, 7, 150], [1, 400, 390]  # 400 keys: two chunks of the split-K loop
    got = kern.paged_attention(q1, q2, k1, k2, v, table, start, count, 0.2)
    torch.testing.assert_close(got, pk.reference(q1, q2, k1, k2, v, table, start, count, 0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mla", [False, True])
def test_paged_attention_kernel_groups_rows_of_one_sequence(mla):
    """Rows sharing a block table (one sequence's tokens of one call: a prefill chunk, drafts) are one
    group whose keys are read once; each row still sees only its own [start, count): causal counts
    across a chunk boundary, sliding-window starts, a lone row between two groups, odd tile ends."""
    from seekwen.fast import paged_kernels as pk

    kern = pk.get()
    if kern is None:
        pytest.skip("no C++ toolchain: the layers gather instead")
    g = torch.Generator().manual_seed(1)
    N, bs = 400, 16
    G, Q, d1, d2 = (1, 5, 48, 16) if mla else (3, 2, 40, 0)
    k1, k2 = torch.randn(N, bs, G, d1, generator=g), torch.randn(N, bs, G, d2, generator=g)
    v = k1 if mla else torch.randn(N, bs, G, 24, generator=g)
    seqs = torch.randperm(N, generator=g)[:90].view(3, 30).int()
    table = torch.cat([seqs[0:1].expand(6, 30), seqs[1:2], seqs[2:3].expand(3, 30)]).contiguous()  # 6 + 1 + 3
    count = [250, 262, 270, 281, 290, 300] + [17] + [3, 4, 5]  # the first group crosses the 256-key chunk
    start = [0, 0, 100, 0, 240, 0] + [0] + [0, 1, 0]  # windows: rows start where they like
    B = table.shape[0]
    q1, q2 = torch.randn(B, G, Q, d1, generator=g), torch.randn(B, G, Q, d2, generator=g)
    got = kern.paged_attention(q1, q2, k1, k2, v, table, start, count, 0.3)
    torch.testing.assert_close(got, pk.reference(q1, q2, k1, k2, v, table, start, count, 0.3), atol=1e-5, rtol=1e-5)


def test_fast_paged_decode_reads_blocks_in_place(family, monkeypatch):
    """The fast path's decode steps over the paged cache go through the kernel (no gather), in the Python
    layers (the compiled step, which calls the same kernel from C++, is off here: test_compiled_step)."""
    from seekwen.fast import paged_kernels as pk

    if pk.get() is None:
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv("SEEKWEN_COMPILED_STEP", "0")
    model, prompts, ref = family
    calls = []
    real = pk.get()

    class Spy:
        def paged_attention(self, *a):
            calls.append(a[5].shape)
            return real.paged_attention(*a)

    monkeypatch.setattr(pk, "get", lambda: Spy())
    fast = prepare(copy.deepcopy(model))
    engine = Engine(fast, max_batch=3, max_len=40, paged=True, block_size=4)
    assert engine.generate(prompts[:3], _params(MAX_NEW[:3])) == ref[:3]
    assert len(calls) >= model.cfg.num_layers * (max(MAX_NEW[:3]) - 1)


def test_row_pool_engine_abort(bundled):
    """`abort` on the row-pool engine too: a waiting and a live request stop, the others are unchanged."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 9, 7, 4)]
    ref = _reference(bundled, prompts, [6] * 4)
    engine = Engine(bundled, max_batch=2, max_len=32)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, _params([6] * 4), strict=True)]
    out: dict[int, list[int]] = {}
    for ev in engine.step():
        out.setdefault(ev.id, []).append(ev.token)
    assert engine.abort(ids[0]) and engine.abort(ids[3])  # live, waiting
    for ev in engine.stream():
        out.setdefault(ev.id, []).append(ev.token)
    assert out[ids[1]] == ref[1] and out[ids[2]] == ref[2] and ids[3] not in out
    assert engine.finished[ids[0]].reason == engine.finished[ids[3]].reason == "abort"

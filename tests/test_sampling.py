"""Sampling options against their definitions: penalties, min-p, top-k/top-p, logprobs, seeds; and the
engine's per-request options (penalties, logprobs, stop strings, abort, n samples, stats)."""

from __future__ import annotations

import math

import pytest
import torch
from hf_models import SPECS, make_checkpoint

import seekwen
from seekwen.runtime.engine import Engine, SamplingParams
from seekwen.runtime.sampling import apply_penalties, filter_logits, logprobs, sample
from seekwen.tools.common import bundled_model_path

HAS_BUNDLED = (bundled_model_path() / "model.safetensors").is_file()


def test_penalties_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=g) * 3
    counts = torch.zeros(3, 12)
    counts[0, 1], counts[0, 4] = 2, 1  # row 0 generated token 1 twice, token 4 once
    counts[1, 7] = 3
    seen = counts > 0
    seen[2, 5] = True  # row 2: token 5 only in the prompt
    pres, freq, rep = torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.25, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.3])
    out = apply_penalties(logits, counts, seen, pres, freq, rep)
    want = logits.clone()
    for b in range(3):
        for v in range(12):
            x = want[b, v].item()
            if seen[b, v]:
                x = x / rep[b].item() if x > 0 else x * rep[b].item()
            x -= freq[b].item() * counts[b, v].item() + pres[b].item() * (counts[b, v].item() > 0)
            want[b, v] = x
    torch.testing.assert_close(out, want)
    # all off: unchanged
    torch.testing.assert_close(apply_penalties(logits, counts, seen), logits)


def test_min_p_top_k_top_p_keep_the_defined_sets():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g) * 2
    temp = torch.tensor([1.0, 0.7, 1.5, 1.0])
    min_p = torch.tensor([0.1, 0.0, 0.3, 0.05])
    top_k = torch.tensor([0, 5, 0, 10])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.5])
    kept_x, order = filter_logits(logits, temp, top_k, top_p, min_p)
    for b in range(4):
        probs = (logits[b] / temp[b]).softmax(-1)
        keep = probs >= min_p[b] * probs.max()
        if top_k[b] > 0:
            keep &= probs >= probs.topk(int(top_k[b])).values[-1]
        p = torch.where(keep, probs, 0.0)
        p = p / p.sum()
        sp, idx = p.sort(descending=True)
        above = sp.cumsum(0) - sp
        nucleus = set(idx[(above < top_p[b]) & (sp > 0)].tolist()) | {int(idx[0])}
        got = set(order[b][kept_x[b] > float("-inf")].tolist())
        assert got == nucleus, b
    # sampled tokens always come from the kept sets
    for s in range(20):
        tok = sample(logits, temp, top_k, top_p, torch.Generator().manual_seed(s), min_p)
        for b in range(4):
            assert bool(kept_x[b][(order[b] == tok[b]).nonzero()[0, 0]] > float("-inf"))


def test_greedy_rows_and_seeds():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    temp = torch.tensor([0.0, 1.0, 0.0])
    a = sample(logits, temp, generator=torch.Generator().manual_seed(5))
    b = sample(logits, temp, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax()
    draws = {int(sample(logits[1:2], 1.0, generator=torch.Generator().manual_seed(s))[0]) for s in range(40)}
    assert len(draws) > 1


def test_logprobs_are_the_model_distribution():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)) * 4
    tokens = torch.tensor([0, 3, 39, 7, logits[4].argmax().item()])
    chosen, top_i, top_v = logprobs(logits, tokens, 6)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, ref[torch.arange(5), tokens])
    assert top_i.shape == (5, 6)
    assert bool((top_v[:, :-1] >= top_v[:, 1:]).all())  # most likely first
    assert bool((top_v.exp().sum(-1) <= 1 + 1e-6).all())
    assert top_i[4, 0] == tokens[4] and math.isclose(top_v[4, 0].item(), chosen[4].item(), rel_tol=1e-6)
    assert logprobs(logits, tokens, 0)[1].shape == (5, 0)


# ---- the engine's per-request options -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, folder = make_checkpoint(SPECS["qwen2"], tmp_path_factory.mktemp("qwen2"))
    return seekwen.load(folder, dtype=torch.float32)


def _penalized_reference(model, prompt, n, pres, freq, rep):
    """Greedy with penalties by their definitions, recomputing the full forward each step."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float()
        for v in set(ids):
            x = logits[v]
            logits[v] = x / rep if x > 0 else x * rep
        for v in set(out):
            logits[v] -= freq * out.count(v) + pres
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
    return out


def test_engine_penalties_equal_reference(tiny):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 160, (n,), generator=g).tolist() for n in (6, 11, 4)]
    settings = [(0.0, 0.0, 1.0), (0.5, 1.0, 1.0), (0.0, 0.0, 1.5)]  # row 0 unpenalised next to penalised rows
    params = [SamplingParams(max_tokens=9, ignore_eos=True, presence_penalty=p, frequency_penalty=f,
                             repetition_penalty=r) for p, f, r in settings]
    out = Engine(tiny, max_batch=3, max_len=32).generate(prompts, params)
    for prompt, (p, f, r), o in zip(prompts, settings, out, strict=True):
        assert o == _penalized_reference(tiny, prompt, 9, p, f, r)


def test_engine_logprobs_abort_stats_and_samples(tiny):
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 160, (n,), generator=g).tolist() for n in (5, 9, 7, 3)]
    engine = Engine(tiny, max_batch=2, max_len=32)
    seen: dict[int, list] = {}
    ids = [engine.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3),
                              on_token=lambda ev: seen.setdefault(ev.id, []).append(ev)) for p in prompts]
    engine.step()
    engine.step()
    assert engine.stats.running == 2 and engine.stats.waiting == 2
    assert engine.abort(ids[0]) and engine.abort(ids[3])  # one running, one still waiting
    assert not engine.abort(ids[0]) and not engine.abort(12345)
    assert engine.stats.running == 1 and engine.stats.waiting == 1
    for _ in engine.stream():
        pass
    assert engine.finished[ids[0]].reason == "abort" and engine.finished[ids[3]].reason == "abort"
    assert engine.finished[ids[3]].output == []
    st = engine.stats.snapshot()
    assert st.running == 0 and st.waiting == 0 and st.cache_tokens == 0
    assert st.finished == {"abort": 2, "length": 2}
    assert st.prompt_tokens == 5 + 9 + 7 and st.ttft.count == 3
    assert st.generation_tokens == len(seen[ids[0]]) + 16
    # the survivors equal their runs alone; each logprob is the model's, greedy = the top alternative
    for i in (1, 2):
        alone = tiny.generate(torch.tensor([prompts[i]]), max_new_tokens=8, stop_at_eos=False, eos_token_id=[])
        assert [e.token for e in seen[ids[i]]] == alone[0].tolist()
        full = tiny(torch.tensor([prompts[i] + alone[0].tolist()]))[0].log_softmax(-1)
        for j, ev in enumerate(seen[ids[i]]):
            assert len(ev.top_logprobs) == 3 and ev.top_logprobs[0][0] == ev.token
            assert math.isclose(ev.logprob, full[len(prompts[i]) - 1 + j, ev.token].item(), abs_tol=1e-4)
    # n samples with a seed: different from each other, reproducible
    sp = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=3)
    runs = []
    for _ in range(2):
        e = Engine(tiny, max_batch=4, max_len=32)
        rids = e.add_samples(prompts[1], sp, n=3)
        list(e.stream())
        runs.append([e.finished[r].output for r in rids])
    assert runs[0] == runs[1] and len({tuple(o) for o in runs[0]}) > 1


@pytest.mark.skipif(not HAS_BUNDLED, reason="bundled model not built")
def test_engine_stop_strings_on_text():
    model = seekwen.load(bundled_model_path(), dtype=torch.float32)
    tok = model.tokenizer
    prompt = tok.encode("In the beginning")
    engine = Engine(model, max_batch=2, max_len=64)
    ref = engine.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    text = tok.decode(ref)
    pieces = [tok.decode([t]) for t in ref]
    assert "".join(pieces) == text
    # a stop string that spans two tokens: the end of token 5 and the start of token 6
    cut = sum(len(p) for p in pieces[:5])
    stop = text[cut - 2 : cut + 2]
    first = text.find(stop)
    for include in (False, True):
        got: list[str] = []
        rid = engine.add_request(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=["zzzz", stop],
                                                        include_stop_str_in_output=include),
                                 on_token=lambda ev, got=got: got.append(ev.text))
        list(engine.stream())
        req = engine.finished.pop(rid)
        assert req.reason == "stop" and req.stop_reason == stop
        assert "".join(got) == req.text == text[: first + (len(stop) if include else 0)]
    # length: everything, nothing held back
    got = []
    engine.add_request(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=["\u2603"]),
                       on_token=lambda ev: got.append(ev.text))
    list(engine.stream())
    assert "".join(got) == text

"""Speculative decoding (runtime/speculative.py) and DeepSeek-V3's multi-token-prediction layer
(model/mtp.py): the MTP layer loads from the Hub layout (fp8 too) without changing the main model;
its forward is the published formula; greedy speculation equals plain greedy generation for every
proposer (n-gram for every family), batched or not; sampled speculation has the target's
distribution (chi-square); rewinding the cache is exact for MLA, GQA and sliding-window layers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hf_models import SPECS, Spec, make_checkpoint
from safetensors.torch import load_file, save_file

import seekwen
from seekwen.hf.export import save_hf
from seekwen.hf.families import parse_config
from seekwen.runtime.decoder import Decoder
from seekwen.runtime.speculative import Draft, MTPProposer, Sampling, SpecStats, verify
from seekwen.train.init import init_weights

N_NEW = 24


def _repetitive_prompts(vocab: int, lens: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts made of a repeated random phrase (so prompt lookup finds matches)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lens)
    ids = torch.zeros(len(lens), S, dtype=torch.long)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for b, n in enumerate(lens):
        phrase = torch.randint(3, vocab, (5 + b,), generator=g)
        ids[b, S - n :] = phrase.repeat(n // len(phrase) + 1)[:n]
        mask[b, S - n :] = 1
    return ids, mask


def _plain_and_spec(model, ids, mask, n=N_NEW, **spec):
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=n, stop_at_eos=False, eos_token_id=[])
    stats = SpecStats()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, stop_at_eos=False, eos_token_id=[],
                         speculative_stats=stats, **spec)
    return plain, out, stats


# ---- greedy exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("lens", [[14], [14, 6, 19]], ids=["batch1", "batch3"])
def test_greedy_ngram_equals_plain(models, name, lens):
    model = models(name)
    ids, mask = _repetitive_prompts(model.cfg.vocab_size, lens)
    plain, out, stats = _plain_and_spec(model, ids, mask, speculative="ngram", num_speculative_tokens=4)
    assert torch.equal(out, plain)
    assert sum(stats.proposed) > 0 and stats.tokens == len(lens) * (N_NEW - 1)


def test_greedy_ngram_fast_path_and_eos(models):
    """The fast path (what the CLI runs) and EOS handling: rows stop at their first EOS, padding after."""
    from seekwen.fast import prepare

    model = prepare(models("qwen2"))
    ids, mask = _repetitive_prompts(model.cfg.vocab_size, [12, 7])
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=[])
    eos = int(plain[0, 9])  # a token row 0 emits: generation stops there, row 1 pads after its own
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    streamed = []
    out = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0,
                         speculative="ngram", num_speculative_tokens=3, on_token=streamed.append)
    assert torch.equal(out, plain)
    assert torch.equal(torch.stack(streamed, dim=1), plain)


@pytest.mark.parametrize("lens", [[11], [11, 4, 16]], ids=["batch1", "batch3"])
def test_greedy_draft_model_equals_plain(models, lens):
    target, draft = models("deepseek_v3"), models("qwen2")  # same vocabulary size, unrelated weights
    ids, mask = _repetitive_prompts(target.cfg.vocab_size, lens, seed=2)
    plain, out, _ = _plain_and_spec(target, ids, mask, speculative="draft", draft_model=draft, num_speculative_tokens=3)
    assert torch.equal(out, plain)
    # the target drafting for itself: every draft accepted, k + 1 tokens per forward
    _, out, stats = _plain_and_spec(target, ids, mask, speculative="draft", draft_model=target,
                                    num_speculative_tokens=3)
    assert torch.equal(out, plain)
    assert stats.acceptance() == [1.0, 1.0, 1.0]


# ---- the MTP layer: loading, formula, drafting ----------------------------------------------------

MTP_SPEC = Spec("deepseek_v3_mtp", "deepseek_v3", SPECS["deepseek_v3"].kwargs, rope=SPECS["deepseek_v3"].rope,
                extra_json=dict(SPECS["deepseek_v3"].extra_json, num_nextn_predict_layers=1))


def _add_mtp_layer(folder, seed: int = 5) -> dict[str, torch.Tensor]:
    """Append an MTP layer to a checkpoint in the Hub layout: `model.layers.{L}.*` = a decoder block
    (random, shaped like the last layer) + embed_tokens, enorm, hnorm, eh_proj, shared_head."""
    cfg = json.loads((folder / "config.json").read_text())
    L, d, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    last = f"model.layers.{L - 1}."
    new = {f"model.layers.{L}." + n[len(last):]: torch.randn(t.shape, generator=g) * 0.1 + (1.0 if "norm" in n else 0)
           for n, t in state.items() if n.startswith(last)}
    own = {"embed_tokens.weight": state["model.embed_tokens.weight"].clone(), "enorm.weight": None,
           "hnorm.weight": None, "eh_proj.weight": torch.randn(d, 2 * d, generator=g) * 0.1,
           "shared_head.norm.weight": None, "shared_head.head.weight": state["lm_head.weight"].clone()}
    for n, t in own.items():
        new[f"model.layers.{L}.{n}"] = t if t is not None else 1 + 0.2 * torch.randn(d, generator=g)
    save_file({**state, **new}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    assert new[f"model.layers.{L}.shared_head.head.weight"].shape == (V, d)
    return new


@pytest.fixture(scope="module")
def mtp_pair(tmp_path_factory):
    hf, folder = make_checkpoint(MTP_SPEC, tmp_path_factory.mktemp("mtp"))
    written = _add_mtp_layer(folder)
    return hf, folder, written


def test_mtp_checkpoint_loads_main_logits_match_transformers(mtp_pair):
    hf, folder, written = mtp_pair
    ours = seekwen.load(folder, dtype=torch.float32, fast=False)
    assert len(ours.mtp) == 1
    params = dict(ours.named_parameters())
    L = ours.cfg.num_layers
    checks = {"eh_proj.weight": "mtp.0.eh_proj.weight", "enorm.weight": "mtp.0.enorm.weight",
              "shared_head.head.weight": "mtp.0.head.weight",
              "self_attn.kv_b_proj.weight": "mtp.0.block.attn.wkv_b.weight",
              "mlp.experts.3.up_proj.weight": "mtp.0.block.ffn.experts.w3"}
    for hf_name, our in checks.items():
        p = params[our].detach()
        p = p[3] if "experts" in our else p
        assert torch.equal(p, written[f"model.layers.{L}.{hf_name}"]), hf_name
    ids = torch.randint(3, ours.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max().item() < 1e-4  # transformers ignores the MTP layer
        plain = seekwen.load(folder, dtype=torch.float32, mtp=False, fast=False)
        assert len(plain.mtp) == 0 and torch.equal(plain(ids), ours(ids))


def test_mtp_fp8_checkpoint(mtp_pair, tmp_path):
    from test_fp8 import FP8_LINEAR, dequantize_ref, quantize_fp8

    _, folder, _ = mtp_pair
    state = load_file(str(folder / "model.safetensors"))
    L = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    expected = {}
    for name in list(state):
        if name.startswith(f"model.layers.{L}.") and name.endswith((*FP8_LINEAR, "eh_proj.weight")):
            q, s = quantize_fp8(state[name])
            state[name], state[name + "_scale_inv"] = q, s
            expected[name] = dequantize_ref(q, s)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = seekwen.load(tmp_path, dtype=torch.float32, fast=False)
    params = dict(model.named_parameters())
    assert torch.equal(params["mtp.0.eh_proj.weight"].detach(), expected[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(params["mtp.0.block.attn.wq_a.weight"].detach(),
                       expected[f"model.layers.{L}.self_attn.q_a_proj.weight"])


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_mtp_forward_is_the_formula(mtp_pair):
    """logits = head(RMSNorm(Block(eh_proj([RMSNorm_e(Emb(t_{i+1})); RMSNorm_h(h_i)])))), embedding half first."""
    _, folder, written = mtp_pair
    model = seekwen.load(folder, dtype=torch.float32, fast=False)
    L, eps = model.cfg.num_layers, model.cfg.rms_norm_eps
    w = {n.removeprefix(f"model.layers.{L}."): t for n, t in written.items()}
    ids = torch.randint(3, model.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, h = model(ids, return_hidden=True)  # h_i: final-normed hidden states [1, 10, d]
        nxt = ids[:, 1:]  # t_{i+1} for i = 0..8
        e = _rms(F.embedding(nxt, w["embed_tokens.weight"]), w["enorm.weight"], eps)
        hh = _rms(h[:, :-1], w["hnorm.weight"], eps)
        W = w["eh_proj.weight"]
        x = e @ W[:, : e.shape[-1]].T + hh @ W[:, e.shape[-1]:].T
        mtp = model.mtp[0]
        x = mtp.block(x, model.uncached_batch(nxt, None, None))  # the block: the decoder's own Block
        ref = _rms(x, w["shared_head.norm.weight"], eps) @ w["shared_head.head.weight"].T
        ours = mtp(nxt, h[:, :-1], model.uncached_batch(nxt, None, None))
    assert (ours - ref).abs().max().item() < 1e-4


def test_mtp_export_round_trip(mtp_pair, tmp_path):
    _, folder, _ = mtp_pair
    model = seekwen.load(folder, dtype=torch.float32, fast=False)
    save_hf(model, tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    L = model.cfg.num_layers
    assert {f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.shared_head.head.weight",
            f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.mlp.experts.0.gate_proj.weight"} <= names
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    again = seekwen.load(tmp_path, dtype=torch.float32, fast=False)
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("lens", [[13], [13, 5, 18]], ids=["batch1", "batch3"])
@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_greedy_mtp_equals_plain_and_mtp_cache_is_exact(mtp_pair, lens, fast):
    _, folder, _ = mtp_pair
    model = seekwen.load(folder, dtype=torch.float32, fast=fast)
    ids, mask = _repetitive_prompts(model.cfg.vocab_size, lens, seed=3)
    k = 3
    proposer = MTPProposer(model, len(lens), ids.shape[1] + N_NEW + k + 1)
    plain, out, stats = _plain_and_spec(model, ids, mask, speculative=proposer, num_speculative_tokens=k)
    assert torch.equal(out, plain) and sum(stats.proposed) > 0
    # after all the rounds and rewinds, the MTP's next draft equals the layer run over the whole sequence
    b = len(lens) - 1
    seq = torch.cat((ids[b, -lens[b]:], out[b]))  # the history of row b (its last token: not yet read)
    with torch.no_grad():
        _, h = model(seq[None, :-1], return_hidden=True)
        ref = model.mtp[0](seq[None, 1:], h, model.uncached_batch(seq[None, 1:], None, None))[0, -1]
    assert (proposer.logits[b] - ref).abs().max().item() < 1e-3


# ---- sampling: the target's distribution -----------------------------------------------------------


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts against probabilities (cells with p > 0)."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a sample where the target has no mass"
    expected = probs[keep].double() * n
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft_q", "one_hot_q"])
def test_verify_rejection_rule_keeps_target_distribution(deterministic):
    """The first emitted token of a verify step is distributed as p_0 for any draft distribution q."""
    torch.manual_seed(0)
    B, K, V = 40000, 3, 6
    p_logits = torch.randn(1, K + 1, V).expand(B, K + 1, V)
    q = torch.softmax(torch.randn(K, V) * 2, -1).expand(B, K, V)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=torch.Generator().manual_seed(1)).view(B, K)
    draft = Draft(tokens, torch.full((B,), K), None if deterministic else q)
    sampling = Sampling(temperature=1.0, generator=torch.Generator().manual_seed(2))
    out, accepted = verify(p_logits, draft, sampling)
    first = out[:, 0]
    assert _chi_square_p(torch.bincount(first, minlength=V), torch.softmax(p_logits[0, 0], -1)) > 1e-3
    assert 0 < float(accepted.float().mean()) < K


TINY_VOCAB = 8


def _tiny_vocab_model(model_type: str, seed: int, mtp: int = 0):
    raw = dict(model_type=model_type, vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               rope_theta=10000.0, eos_token_id=None)
    if model_type == "deepseek_v3":
        raw.update(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=8, num_nextn_predict_layers=mtp)
    model = seekwen.build(parse_config(raw), torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        init_weights(model, std=0.5)  # a peaked, far from uniform, distribution
    return model.eval()


@pytest.mark.parametrize("kind", [pytest.param("draft", marks=pytest.mark.slow), "ngram", "mtp"])
def test_sampled_speculation_has_the_target_distribution(kind):
    """Many rows of one prompt, top-p sampling: the joint distribution of new tokens 2 and 3 (both decided
    by verification) matches the target's exact one, P(t2, t3) = sum_t1 P(t1) P(t2|t1) P(t3|t1, t2)."""
    target = _tiny_vocab_model("deepseek_v3", seed=1, mtp=1)
    draft = _tiny_vocab_model("qwen2", seed=2)
    prompt = torch.tensor([[3, 5, 3, 5, 3]])
    B, V, temp, top_p = 6000, TINY_VOCAB, 1.0, 0.9
    sampling = Sampling(temp, 0, top_p)
    with torch.no_grad():
        p1 = sampling.probs(target(prompt)[:, -1])[0]  # [V]
        two = torch.cat((prompt.expand(V, -1), torch.arange(V)[:, None]), 1)
        p2 = sampling.probs(target(two)[:, -1])  # [V(t1), V(t2)]
        three = torch.cat((two.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]), 1)
        p3 = sampling.probs(target(three)[:, -1]).view(V, V, V)  # [t1, t2, t3]
    exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # [t2 * V + t3]
    stats = SpecStats()
    out = target.generate(prompt.expand(B, -1), max_new_tokens=4, temperature=temp, top_p=top_p, seed=0,
                          eos_token_id=[], speculative=kind, draft_model=draft, num_speculative_tokens=2,
                          speculative_stats=stats)
    counts = torch.bincount(out[:, 1] * V + out[:, 2], minlength=V * V)
    assert _chi_square_p(counts, exact) > 1e-3
    assert 0 < sum(stats.accepted) < sum(stats.proposed)


# ---- cache rollback --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2", "qwen2_sliding"], ids=["mla", "gqa", "sliding"])
def test_rewind_is_exact(models, name):
    """Prefill, extend with drafts, rewind each row to its own length, extend other tokens: the logits
    equal a fresh forward over the kept sequence (the window layers of qwen2_sliding hold 6 tokens)."""
    model = models(name)
    g = torch.Generator().manual_seed(4)
    V, lens, keep = model.cfg.vocab_size, [9, 5], [2, 4]
    dec = Decoder(model, 2, 40, ring=False)
    prompt = torch.randint(3, V, (2, 9), generator=g)
    drafts, more = torch.randint(3, V, (2, 6), generator=g), torch.randint(3, V, (2, 4), generator=g)
    with torch.no_grad():
        dec.prefill(prompt, torch.tensor(lens))
        dec.extend(drafts, all_logits=True)
        dec.rewind(torch.tensor(lens) + torch.tensor(keep))
        got = dec.extend(more, all_logits=True)
        for b in range(2):
            seq = torch.cat((prompt[b, : lens[b]], drafts[b, : keep[b]], more[b]))
            ref = model(seq[None])[0, -4:]
            assert (got[b] - ref).abs().max().item() < 1e-4
    if model.cfg.sliding_window[-1]:  # a ring buffer can go back one token only
        ring = Decoder(model, 1, 40)
        ring.prefill(prompt[:1])
        ring.extend(drafts[:1])
        with pytest.raises(ValueError, match="one token at most"):
            ring.rewind(9 + 2)


def test_speculation_argument_errors(models):
    model = models("qwen2")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="unknown speculative method"):
        model.generate(ids, speculative="medusa")
    with pytest.raises(ValueError, match="needs a draft model"):
        model.generate(ids, speculative="draft")
    with pytest.raises(ValueError, match="no multi-token-prediction layer"):
        model.generate(ids, speculative="mtp")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        model.generate(ids, speculative="ngram", num_speculative_tokens=0)
    assert math.isnan(SpecStats().tokens_per_forward()) is False

"""Every inference fast path equals the plain reference path (fp32, tiny random checkpoints):
transposed/fused linears, absorbed MLA decode, grouped MoE (decode and prefill), GQA decode without
K/V repeat, the ring-buffer cache of sliding-window layers; int8/int4 exact against their own
dequantized weights and close to fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import SPECS
from torch import nn

import seekwen
from seekwen.fast import GroupedExperts, kernels, prepare
from seekwen.fast import linear as L
from seekwen.model.moe import Experts
from seekwen.runtime.decoder import Decoder

TOL = 1e-4
NAMES = ["qwen2", "qwen2_sliding", "qwen3", "qwen2_moe", "deepseek_v2", "deepseek_v3"]


@pytest.fixture(scope="module", params=NAMES)
def pair(request, hub_checkpoint):
    spec = SPECS[request.param]
    _, folder = hub_checkpoint(spec.name)
    plain = seekwen.load(folder, dtype=torch.float32, fast=False)
    return spec.name, plain, prepare(copy.deepcopy(plain))


def _ids(vocab: int, B: int, S: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_prepared_forward_equals_plain(pair):
    _, plain, fast = pair
    ids = _ids(plain.cfg.vocab_size, 3, 19)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    diff = (fast(ids, attention_mask=mask) - plain(ids, attention_mask=mask)).abs().max()
    assert diff <= TOL


@torch.inference_mode()
def test_prepared_cached_decode_equals_plain(pair):
    """Prefill then single-token steps through the cache: absorbed MLA, GQA fold, fused projections."""
    _, plain, fast = pair
    ids = _ids(plain.cfg.vocab_size, 2, 24, seed=1)
    outs = []
    for model in (plain, fast):
        dec = Decoder(model, 2, 24)
        logits = [dec.extend(ids[:, :16], all_logits=True)]
        for t in range(16, 24):
            logits.append(dec.step(ids[:, t])[:, None])
        outs.append(torch.cat(logits, dim=1))
    assert (outs[0] - outs[1]).abs().max() <= TOL
    assert (outs[0] - plain(ids)).abs().max() <= TOL  # and both equal the cache-less forward


@torch.inference_mode()
def test_prepared_generate_identical(pair):
    _, plain, fast = pair
    ids = _ids(plain.cfg.vocab_size, 3, 11, seed=2)
    a = plain.generate(ids, max_new_tokens=10, stop_at_eos=False)
    b = fast.generate(ids, max_new_tokens=10, stop_at_eos=False)
    assert torch.equal(a, b)


@torch.inference_mode()
def test_mla_fast_absorbed_equals_naive(pair):
    name, _, fast = pair
    if fast.cfg.mla is None:
        pytest.skip("not MLA")
    ids = _ids(fast.cfg.vocab_size, 2, 12, seed=3)
    outs = []
    for mode in ("naive", "absorb"):
        for layer in fast.layers:
            layer.attn.mode = mode
        dec = Decoder(fast, 2, 12)
        dec.extend(ids[:, :8])
        outs.append(dec.extend(ids[:, 8:], all_logits=True))
    for layer in fast.layers:
        layer.attn.mode = "auto"
    assert (outs[0] - outs[1]).abs().max() <= TOL


@torch.inference_mode()
@pytest.mark.parametrize("fused", [True, False])  # one C++ call (kernels.moe_experts) or per-expert products
@pytest.mark.parametrize("n_tokens", [1, 2, 7, 12, 20])  # 20 > kernels.MAX_ROWS: per-expert products (prefill)
def test_grouped_experts_equal_stacked(n_tokens, fused):
    torch.manual_seed(0)
    E, D, I, k = 8, 32, 24, 3
    ref = Experts(E, D, I)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.1)
    fast = GroupedExperts(ref)
    assert fast.use_kernels == (kernels.get() is not None)  # fp32 on CPU: the fused call where it exists
    fast.use_kernels = fused and fast.use_kernels
    x = torch.randn(n_tokens, D)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n_tokens)])
    w = torch.rand(n_tokens, k)
    assert (fast(x, w, idx) - ref(x, w, idx)).abs().max() <= 1e-5


@torch.inference_mode()
def test_fast_linear_and_fuse():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 24, bias=True), nn.Linear(16, 8, bias=False)
    x = torch.randn(3, 5, 16)
    assert (L.FastLinear(a.weight, a.bias)(x) - a(x)).abs().max() <= 1e-5
    fused = L.fuse([a, b])(x)
    assert (fused - torch.cat((a(x), b(x)), -1)).abs().max() <= 1e-5


def _sliding_model(hub_checkpoint) -> seekwen.Transformer:
    _, folder = hub_checkpoint("qwen2_sliding")  # window 6, layers 1-2 slide
    return seekwen.load(folder, dtype=torch.float32, fast=False)


@torch.inference_mode()
def test_ring_cache_equals_full_cache(hub_checkpoint):
    """Prefill longer than the window, right-padded rows, chunked prefill, then decode: the ring buffer
    (window slots) gives the same logits as the full cache."""
    model = _sliding_model(hub_checkpoint)
    cfg = model.cfg
    assert any(w is not None for w in cfg.sliding_window)
    ids = _ids(cfg.vocab_size, 2, 30, seed=4)
    lens = torch.tensor([20, 13])  # row 1 is right-padded in the first chunk
    outs = []
    for ring in (True, False):
        dec = Decoder(model, 2, 40, ring=ring)
        assert bool(dec.cache.windows) == ring
        first = dec.prefill(ids[:, :20], lens)
        chunk = torch.stack([ids[0, 20:27], ids[1, 13:20]])  # a 7-token chunk each, > window
        second = dec.extend(chunk, all_logits=True)
        steps = []
        for t in range(5):
            steps.append(dec.step(chunk[:, t])[:, None])
        outs.append((first, second, torch.cat(steps, 1)))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert (a - b).abs().max() <= TOL
    # and the full-cache path equals the cache-less forward for the unpadded row
    full = model(torch.cat((ids[:1, :20], ids[:1, 20:27]), 1))
    assert (outs[0][1][0] - full[0, 20:27]).abs().max() <= TOL


# ---- quantization -----------------------------------------------------------------------------------


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 4, 20])  # kernel (few rows) and dequantize + mm (many rows)
def test_quantized_linear_exact_vs_dequantized(kind, rows):
    torch.manual_seed(0)
    w, b = torch.randn(48, 128), torch.randn(48)
    layer = L.make_linear(w, b, kind, group_size=32)
    x = torch.randn(rows, 128)
    ref = L.reference_forward(layer, x)
    assert (layer(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    err = (layer.dequantized() - w).abs().max() / w.abs().max()
    assert err < (0.01 if kind == "int8" else 0.1)  # the quantization itself is close to fp32


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_model_close_to_fp32(kind, hub_checkpoint):
    _, folder = hub_checkpoint("qwen2")
    plain = seekwen.load(folder, dtype=torch.float32, fast=False)
    q = prepare(copy.deepcopy(plain), quantize=kind, group_size=32)
    ids = _ids(plain.cfg.vocab_size, 2, 16, seed=5)
    a, b = plain(ids).flatten(), q(ids).flatten()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert cos > (0.999 if kind == "int8" else 0.95)
    assert (q(ids) - a.view_as(q(ids))).abs().max() > 0  # it is really quantized


@torch.inference_mode()
def test_quantized_decode_kernel_path_matches_prefill_path(hub_checkpoint):
    """int8 model: cached decode (kernel, 1 row) equals the cache-less forward (dequantize + mm)."""
    _, folder = hub_checkpoint("deepseek_v2")
    q = prepare(seekwen.load(folder, dtype=torch.float32, fast=False), quantize="int8")
    ids = _ids(q.cfg.vocab_size, 1, 12, seed=6)
    dec = Decoder(q, 1, 12)
    dec.extend(ids[:, :10])
    steps = []
    for t in range(10, 12):
        steps.append(dec.step(ids[:, t])[:, None])
    assert (torch.cat(steps, 1) - q(ids)[:, 10:]).abs().max() <= 1e-3

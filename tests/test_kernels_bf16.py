"""bf16 weights with bf16 activations (`kernels.bf16_mm`, AVX512-BF16 vdpbf16ps; csrc/bf16dot.h), llama.cpp's
arithmetic for BF16 files and the default for bf16 weights on such CPUs: the kernel against a float64
product of the same math (bf16(x) . w^T) for the few-row (1..16) and many-row (17+) loops, odd K and N,
bias on and off; the activation rounding bit for bit against torch's x.bfloat16(); the layer's default
path within the activation-rounding bound of the exact one, `block_activations("fp32")` giving the exact
path; what `describe_linear` says; and a tiny model in bf16 generating, with logits close to fp32's.
Skipped where the CPU (or the build) lacks AVX512-BF16."""

from __future__ import annotations

import copy

import pytest
import torch

import seekwen
from seekwen.fast import kernels, prepare
from seekwen.fast import linear as L

K_ = kernels.get()
needs_bf16 = pytest.mark.skipif(K_ is None or not K_.has_bf16_mm(), reason="no AVX512-BF16 kernels here")
ROWS = [*range(1, 17), 17, 31, 64, 100, 512]
SHAPES = [(7, 5), (200, 13), (904, 37), (32, 8), (896, 1), (33, 24), (64, 17)]  # (K, N): odd K and N


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The same math in float64: x rounded to bf16, times the bf16 weight, + bias."""
    y = x.bfloat16().double() @ w.double().T
    return y if b is None else y + b.double()


def _tol(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 summation error of a K-term dot product, with margin: K * 2^-24 * sum |x| |w| (+ a floor)."""
    K = x.shape[1]
    return K * 2**-24 * (x.bfloat16().double().abs() @ w.double().abs().T) + 1e-6


@needs_bf16
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_mm_equals_reference(M, bias):
    g = torch.Generator().manual_seed(M)
    for K, N in SHAPES if M <= 100 else SHAPES[:3]:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).bfloat16()
        b = torch.randn(N, generator=g) if bias else None
        y = K_.bf16_mm(x, w, b)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert ((y.double() - _ref(x, w, b)).abs() <= _tol(x, w)).all(), (M, K, N)


@needs_bf16
def test_bf16_mm_output_not_rounded_to_bf16():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 256, generator=g), torch.randn(24, 256, generator=g).bfloat16()
    for M in (3, 40):  # both loops
        y = K_.bf16_mm(x[:M], w, None)
        assert not torch.equal(y, y.bfloat16().float())


@needs_bf16
def test_bf16_mm_large_k_many_chunks():
    """K longer than the many-row loop's chunk of K (several chunks added into y), M not a multiple of 16."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(50, 4864 + 3, generator=g), torch.randn(19, 4864 + 3, generator=g).bfloat16(), torch.randn(19)
    assert ((K_.bf16_mm(x, w, b).double() - _ref(x, w, b)).abs() <= _tol(x, w)).all()


@needs_bf16
def test_round_bf16_matches_torch_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 1001, generator=g) * torch.logspace(-44, 38, 1001)  # denormals .. near fp32 max
    x[0, :6] = torch.tensor([float("inf"), -float("inf"), 3.4e38, -0.0, 0.0, 1e-45])
    # ties: exactly halfway between two bf16 values, both parities of the kept bit
    x[1, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130 * (1 + 2**-8)])
    got = K_.round_bf16(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), x.bfloat16().view(torch.int16))
    nan = K_.round_bf16(torch.tensor([[float("nan"), -float("nan"), 1.0]]))
    assert nan[0, :2].isnan().all() and nan[0, 2] == 1


@needs_bf16
def test_nan_and_inf_propagate():
    x, w = torch.ones(20, 40), torch.ones(3, 40).bfloat16()
    x[0, 5], x[1, 7] = float("nan"), float("inf")
    for M in (2, 20):
        y = K_.bf16_mm(x[:M], w, None)
        assert y[0].isnan().all() and y[1].isinf().all() and (y[1] > 0).all() and (y[2:] == 40).all()


@needs_bf16
def test_empty_k_gives_the_bias():
    for M in (2, 20):
        x, w, b = torch.randn(M, 0), torch.randn(3, 0).bfloat16(), torch.randn(3)
        assert torch.equal(K_.bf16_mm(x, w, b), b.expand(M, 3))
        assert torch.equal(K_.bf16_mm(x, w, None), torch.zeros(M, 3))


@needs_bf16
def test_bf16_mm_rejects_bad_operands():
    x, w = torch.randn(2, 16), torch.randn(3, 16).bfloat16()
    with pytest.raises(RuntimeError, match="bf16 w"):
        K_.bf16_mm(x, w.half(), None)
    with pytest.raises(RuntimeError, match="fp32 x"):
        K_.bf16_mm(x.double(), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        K_.bf16_mm(x, w, torch.randn(4))


# ---- the layer ------------------------------------------------------------------------------------------


@needs_bf16
@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 64, 100])
def test_layer_default_within_rounding_bound_of_exact(rows):
    torch.manual_seed(rows)
    w, b = torch.randn(40, 200) * 0.1, torch.randn(40)
    layer = L.make_linear(w, b, "bf16")
    x = torch.randn(2, rows, 200)
    assert L.ACTIVATIONS == "q8" and layer.bf16_activations()
    y = layer(x)
    assert torch.equal(y.flatten(0, 1), K_.bf16_mm(x.flatten(0, 1), layer.weight, layer.bias))
    exact = L.reference_forward(layer, x)
    with L.block_activations("fp32"):  # the exact path: fp32 activations
        assert not layer.bf16_activations()
        y_exact = layer(x)
        assert "bf16_mm" not in L.describe_linear(layer)
    assert (y_exact - exact).abs().max() < 1e-4 * 200**0.5
    bound = L.bf16_error_bound(x.flatten(0, 1), layer.dequantized()).view(2, rows, 40)
    diff = (y - exact).abs()
    assert (diff <= bound * 1.001 + 1e-4).all() and diff.max() > 0  # rounded, and within the bound


@needs_bf16
def test_describe_says_which_arithmetic():
    layer = L.make_linear(torch.randn(8, 64), None, "bf16")
    assert L.describe_linear(layer) == "bf16 bf16_mm[avx512bf16] bf16 x bf16 -> fp32 (vdpbf16ps), any rows"
    with L.block_activations("fp32"):
        assert L.describe_linear(layer).startswith("bf16 mm[")
    f16 = L.make_linear(torch.randn(8, 64), None, "f16")  # fp16 weights: always the exact path
    assert not f16.bf16_activations() and "bf16_mm" not in L.describe_linear(f16)


def test_without_avx512bf16_the_exact_path_runs():
    """Forcing the AVX2 code (or a CPU without AVX512-BF16) leaves bf16 weights on the exact path."""
    if K_ is None:
        pytest.skip("kernels unavailable")
    layer = L.make_linear(torch.randn(8, 64), None, "bf16")
    before = K_.isa()
    K_.set_isa("avx2")
    try:
        assert not K_.has_bf16_mm() and not layer.bf16_activations()
        x = torch.randn(3, 64)
        assert (layer(x) - L.reference_forward(layer, x)).abs().max() < 1e-4
    finally:
        K_.set_isa(before)


# ---- a model --------------------------------------------------------------------------------------------


@needs_bf16
@torch.inference_mode()
def test_tiny_model_in_bf16_generates_close_to_fp32(hub_checkpoint):
    _, folder = hub_checkpoint("qwen2")
    plain = seekwen.load(folder, dtype=torch.float32, fast=False)
    q = prepare(copy.deepcopy(plain), quantize="bf16")
    ids = torch.randint(3, plain.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    ref, got = plain(ids), q(ids)  # prefill of 40 rows: the many-row loop
    with L.block_activations("fp32"):
        exact = q(ids)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos > 0.9999 and (got - exact).abs().max() > 0  # close to fp32, and really bf16 activations
    assert (got - exact).norm() / exact.norm() < (exact - ref).norm() / ref.norm()  # below bf16 weights' own error
    out = q.generate(ids[:, :6], max_new_tokens=8, stop_at_eos=False)  # decode: the few-row loop
    assert out.shape == (2, 8)  # the new tokens
    assert "vdpbf16ps" in dict(seekwen.fast.plan(q))["LM head"]

"""`kernels.qmm`, Q8_0 / Q4_0 with int8 activations (llama.cpp's scheme), against a plain torch reference
of the same integer math, EXACTLY (torch.equal): the activations quantized as ggml's quantize_row_q8_0
(d = amax / 127, q = roundf(x / d), halves away from zero), the integer dot per block, and per output
y = fma(float(dot_b), d_w[b] * d_x[b], y) over the blocks in order (+ bias). Every integer code
(AVX512-VNNI, AVX-VNNI, AVX2 maddubs, scalar), rows 1..16 and beyond 64, odd output sizes; the layers in
"q8" mode within `linear.q8_error_bound` of dequantize-then-run, and in "fp32" mode on the exact path."""

from __future__ import annotations

import pytest
import torch

from seekwen.fast import kernels
from seekwen.fast import linear as L

K_ = kernels.get()
needs_kernels = pytest.mark.skipif(K_ is None, reason="no C++ compiler / no AVX2: kernels unavailable")
QISAS = ["avx512vnni", "avxvnni", "avx2", "scalar"]
SHAPES = [(32, 1), (96, 5), (64, 16), (160, 17), (896, 37)]  # (K, N): N % 16 != 0 mostly (padded groups)


@pytest.fixture(params=QISAS)
def qisa(request):
    try:
        K_.set_qisa(request.param)
    except RuntimeError:
        pytest.skip(f"{request.param} not available on this CPU / compiler")
    yield request.param
    K_.set_qisa("auto")


def ref_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], d fp32 [M, K / 32], block sums of q int32 [M, K / 32])."""
    M, K = x.shape
    b = x.view(M, K // 32, 32)
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    v = b * inv[..., None]
    t = torch.trunc(v)
    q = torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t).to(torch.int8)  # C's roundf, exactly
    return q.view(M, K), d, q.sum(-1, dtype=torch.int32)


def ref_qmm(x: torch.Tensor, q: torch.Tensor, dw: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp32, q [N, K] the signed weight codes, dw fp16 [N, K / 32] -> y [M, N] as qmm computes it.
    The fma is taken in float64 and rounded to fp32 once more: the product of two fp32 is exact there, the
    sum rounds twice, which differs from one rounding only on exact float32 midpoints (~2^-29 per step)."""
    xq, dx, _ = ref_quantize(x)
    M, K = x.shape
    N, nb = q.shape[0], K // 32
    dot = torch.einsum("mbk,nbk->mnb", xq.view(M, nb, 32).long(), q.view(N, nb, 32).long()).float()  # exact
    s = dw.float()[None] * dx[:, None, :]  # [M, N, nb]: d_w * d_x in fp32
    y = torch.zeros(M, N)
    for b in range(nb):
        y = (dot[..., b].double() * s[..., b].double() + y.double()).float()
    return y if bias is None else y + bias


@needs_kernels
def test_quantize_act_is_ggmls_rounding(qisa):
    x = torch.zeros(2, 64)
    x[0, :6] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.49999])  # d = 1: exact halves go away from zero
    x[1, :3] = torch.tensor([1.0, -0.25, 0.6])  # second row, first block: d = 1/127
    q, d, s = K_.quantize_act(x)
    assert q[0, :6].tolist() == [127, 3, -3, 1, -1, 1] and not q[0, 6:].any() and not q[1, 32:].any()
    assert q[1, :3].tolist() == [127, -32, 76] and d[0, 0].item() == 1.0 and d[0, 1].item() == 0.0
    assert s[0].tolist() == [128, 0] and s[1].tolist() == [171, 0]
    g = torch.Generator().manual_seed(0)
    for M, K in ((1, 32), (5, 896), (70, 160)):
        x = torch.randn(M, K, generator=g) * torch.rand(M, K // 32, 1, generator=g).repeat(1, 1, 32).view(M, K)
        got, want = K_.quantize_act(x), ref_quantize(x)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("M", [*range(1, 17), 17, 40, 65, 100])
def test_qmm_equals_the_integer_reference(fmt, M, qisa):
    g = torch.Generator().manual_seed(M)
    for K, N in SHAPES:
        layer = L.make_linear(torch.randn(N, K, generator=g), None, fmt)
        packed = K_.qpack(layer.codes, layer.d)
        assert packed.shape == ((N + 15) // 16, K // 32, 544 if fmt == "q8_0" else 288)
        x = torch.randn(M, K, generator=g)
        b = torch.randn(N, generator=g) if N % 2 else None
        want = ref_qmm(x, layer.int_codes(), layer.d, b)
        assert torch.equal(K_.qmm(x, packed, N, b), want), (K, N)


@needs_kernels
def test_qmm_extreme_codes(qisa):
    """Q8_0 codes -128 and 127 (GGUF allows -128) against activations +-127: no saturation anywhere."""
    K, N = 64, 16
    q = torch.full((N, K), -128, dtype=torch.int8)
    q[::2] = 127
    layer = L.Q8_0Linear.from_blocks(q, torch.ones(N, K // 32))
    x = torch.ones(3, K)
    x[1] = -1
    x[2, ::2] = -1
    y = K_.qmm(x, K_.qpack(layer.codes, layer.d), N, None)
    assert torch.equal(y, ref_qmm(x, q, layer.d, None))
    assert abs(y[0, 0].item() - 127 * 64) < 0.01 and abs(y[0, 1].item() + 128 * 64) < 0.01  # x: 127, d = 1/127


@needs_kernels
def test_qmm_rejects_bad_input():
    layer = L.make_linear(torch.randn(20, 64), None, "q4_0")
    p = K_.qpack(layer.codes, layer.d)
    with pytest.raises(RuntimeError, match="packed"):
        K_.qmm(torch.randn(2, 64), p, 33, None)  # wrong N for these groups
    with pytest.raises(RuntimeError, match="K % 32"):
        K_.qmm(torch.randn(2, 40), p, 20, None)
    with pytest.raises(RuntimeError, match="bias"):
        K_.qmm(torch.randn(2, 64), p, 20, torch.randn(3))
    with pytest.raises(RuntimeError, match="block scales"):
        K_.qpack(torch.randn(4, 64).half(), torch.ones(4, 2).half())


@needs_kernels
def test_qisa_selection():
    assert K_.set_qisa("scalar") == "scalar" and K_.set_qisa("avx2") == "avx2"
    with pytest.raises(RuntimeError, match="auto, scalar"):
        K_.set_qisa("sse2")
    before = K_.isa()
    try:
        K_.set_qisa("auto")
        K_.set_isa("avx2")  # auto follows the float kernels' choice: no 512-bit code under avx2
        assert K_.qisa() in ("avxvnni", "avx2")
    finally:
        K_.set_isa(before)
        K_.set_qisa("auto")


# ---- the layers: "q8" within the activations' rounding of dequantize-then-run, "fp32" exact -------------


@needs_kernels
@torch.inference_mode()
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 64, 65, 200])
def test_layers_within_the_activation_rounding(fmt, rows):
    torch.manual_seed(rows)
    K, N = 160, 41
    layer = L.make_linear(torch.randn(N, K), torch.randn(N), fmt)
    x = torch.randn(2, rows, K)
    ref = L.reference_forward(layer, x).view(-1, N)
    bound = L.q8_error_bound(x.view(-1, K), layer.dequantized())
    assert L.ACTIVATIONS == "q8" and "qmm" in L.describe_linear(layer)
    err = (layer(x).view(-1, N) - ref).abs()
    assert (err <= bound * 1.001 + 1e-4).all() and err.max() > 0  # really int8 activations
    assert (err.max() / ref.abs().max()) < 0.02
    with L.block_activations("fp32"):
        assert (layer(x).view(-1, N) - ref).abs().max() < 1e-4 * K**0.5
        assert "qmm" not in L.describe_linear(layer)


def test_block_activations_mode():
    with pytest.raises(ValueError, match="block activations"):
        with L.block_activations("int4"):
            pass
    before = L.ACTIVATIONS
    with L.block_activations("fp32"):
        assert L.ACTIVATIONS == "fp32"
    assert L.ACTIVATIONS == before


@needs_kernels
def test_packed_blocks_follow_the_codes():
    layer = L.make_linear(torch.randn(24, 64), None, "q8_0")
    p = layer.packed(K_)
    assert layer.packed(K_) is p
    layer.codes = torch.nn.Parameter(layer.codes.data.clone(), requires_grad=False)
    assert layer.packed(K_) is not p and torch.equal(layer.packed(K_), p)


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_qmm_rows_do_not_depend_on_the_batch(fmt, qisa):
    """Each row is quantized on its own and its outputs summed in one fixed order: a row's result is the
    same bits whether it runs alone, in a batch of 8, or of 70 (decode vs prefill, batch composition)."""
    g = torch.Generator().manual_seed(3)
    layer = L.make_linear(torch.randn(37, 160, generator=g), None, fmt)
    p = K_.qpack(layer.codes, layer.d)
    x = torch.randn(70, 160, generator=g)
    y = K_.qmm(x, p, 37, None)
    assert torch.equal(K_.qmm(x[5:13], p, 37, None), y[5:13])
    assert all(torch.equal(K_.qmm(x[i : i + 1], p, 37, None), y[i : i + 1]) for i in (0, 9, 69))


@needs_kernels
@pytest.mark.parametrize("cls", [L.Q8_0Linear, L.Q4_0Linear])
@pytest.mark.parametrize("K, N", [(96, 37), (64, 16), (32, 1)])
def test_packed_blocks_are_the_only_copy(cls, K, N):
    """After the first int8-activation call a layer holds its weights once: the codes' storage is
    released and rebuilt, exactly, from the packed blocks when something reads them (the exact path,
    dequantized(), a state dict); results do not change."""
    g = torch.Generator().manual_seed(K + N)
    lo, hi = (-128, 128) if cls is L.Q8_0Linear else (-8, 8)
    q = torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int8)
    d = torch.rand(N, K // 32, generator=g) + 0.01
    b = torch.randn(N, generator=g)
    layer, twin = cls.from_blocks(q, d, b), cls.from_blocks(q, d, b)
    stored, x = layer.codes.detach().clone(), torch.randn(3, K, generator=g)
    with torch.no_grad():
        with L.block_activations("fp32"):
            exact = twin(x)
        fast = layer(x)  # int8 activations: packs, then releases the codes
        assert layer.codes.numel() == 0
        assert torch.equal(layer(x), fast)
        assert torch.equal(layer.int_codes(), q) and torch.equal(layer.codes, stored)  # rebuilt exactly
        assert torch.equal(layer.state_dict()["codes"], stored)
        with L.block_activations("fp32"):
            assert torch.equal(layer(x), exact)
        assert layer.codes.numel() == stored.numel()  # the exact path keeps them from now on
        assert torch.equal(layer(x), fast)


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("rows", [[1], [1, 1, 1, 1, 1, 1], [3, 1, 5], [16]])
def test_qmm_experts_equals_qmm_per_expert(fmt, rows, qisa):
    """qmm_experts (one MoE layer's chosen experts, Q8_0 / Q4_0, int8 activations): each expert's rows are
    qmm(x, gate/up) -> silu(gate) * up -> qmm(., down), bit for bit, whatever else runs in the call."""
    g = torch.Generator().manual_seed(len(rows) + sum(rows))
    D, I = 96, 64
    w13 = [L.make_linear(torch.randn(2 * I, D, generator=g), None, fmt) for _ in rows]
    w2 = [L.make_linear(torch.randn(D, I, generator=g), None, fmt) for _ in rows]
    p13 = [K_.qpack(la.codes, la.d) for la in w13]
    p2 = [K_.qpack(la.codes, la.d) for la in w2]
    xs = torch.randn(sum(rows), D, generator=g)
    ys = K_.qmm_experts(xs, p13, p2, rows, I)
    r0 = 0
    for e, n in enumerate(rows):
        h = K_.qmm(xs[r0 : r0 + n].contiguous(), p13[e], 2 * I, None)
        act = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]).contiguous()
        assert torch.equal(ys[r0 : r0 + n], K_.qmm(act, p2[e], D, None)), e
        r0 += n
    with pytest.raises(RuntimeError, match="add up"):
        K_.qmm_experts(xs, p13, p2, [r + 1 for r in rows], I)
    with pytest.raises(RuntimeError, match="packed"):
        K_.qmm_experts(xs, p2, p13, rows, I)  # gate/up and down swapped


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("n_tokens", [1, 5, 16, 40])
def test_grouped_experts_int8_activations(fmt, n_tokens):
    """GroupedExperts with Q8_0 / Q4_0 experts in the default "q8" mode: one qmm_experts call, the same
    result as summing each chosen expert's own layers (which run qmm); the experts keep their packed
    blocks only."""
    from seekwen.fast import GroupedExperts
    from seekwen.model.moe import Experts, dispatch

    torch.manual_seed(n_tokens)
    E, D, I, k = 8, 64, 96, 3
    ref = Experts(E, D, I)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    fast = GroupedExperts(ref, fmt)
    x = torch.randn(n_tokens, D)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n_tokens)])
    w = torch.rand(n_tokens, k)
    with torch.inference_mode():
        got = fast(x, w, idx)
        want = dispatch(x, w, idx, E, fast.expert)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert "qmm_experts" in fast.describe()
    used = set(idx.flatten().tolist())
    assert all(fast.w13[e].codes.numel() == 0 and fast.w2[e].codes.numel() == 0 for e in used)


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_qmm_grouped_equals_qmm_per_group(fmt, qisa):
    g = torch.Generator().manual_seed(7)
    K, N, rows = 64, 40, [2, 1, 5]
    layers = [L.make_linear(torch.randn(N, K, generator=g), None, fmt) for _ in rows]
    packed = [K_.qpack(la.codes, la.d) for la in layers]
    xs = torch.randn(sum(rows), K, generator=g)
    y = K_.qmm_grouped(xs, packed, rows, N)
    r0 = 0
    for p, n in zip(packed, rows, strict=True):
        assert torch.equal(y[r0 : r0 + n], K_.qmm(xs[r0 : r0 + n].contiguous(), p, N, None))
        r0 += n
    with pytest.raises(RuntimeError, match="add up"):
        K_.qmm_grouped(xs, packed, [1, 1, 1], N)

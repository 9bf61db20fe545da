"""The few-row kernels (kernels.py) against float64 references, with each instruction set the CPU has
(AVX2; AVX-512 where available, else those cases skip): every activation row count the kernels serve
(1..16: one pass up to 8 rows with AVX-512 / 4 with AVX2, then more passes), K not a multiple of the vector width
(masked tails), N not a multiple of the 12-row tile, with and without bias; int8/int4 against their
dequantized weights; the grouped MoE experts call against per-expert products; the absorbed-MLA decode
attention against its float64 formula."""

from __future__ import annotations

import pytest
import torch

from seekwen.fast import kernels
from seekwen.fast import linear as L

K_ = kernels.get()
pytestmark = pytest.mark.skipif(K_ is None, reason="no C++ compiler / no AVX2: kernels unavailable")
SHAPES = [(896, 37), (13, 5), (7, 3), (100, 9), (1, 4), (64, 130), (8, 1), (1100, 13), (33, 24)]  # (K, N)
ISAS = ["avx2", "avx512"]


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("M", range(1, 17))
@pytest.mark.parametrize("bias", [False, True])
def test_f32_and_int8_kernels(M, bias, isa):
    g = torch.Generator().manual_seed(M)
    for K, N in SHAPES:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g) if bias else None
        assert (K_.f32_mm(x, w, b).double() - _ref(x, w, b)).abs().max() < 1e-4 * K**0.5
        q, s = L.quantize_int8(w)
        deq = q.double() * s.double()[:, None]
        assert (K_.int8_mm(x, q, s, b).double() - _ref(x, deq, b)).abs().max() < 1e-4 * K**0.5


@pytest.mark.parametrize("M", [1, 3, 8])
def test_f32_bmm_per_head(M, isa):
    """f32_bmm (MLA's absorbed decode): y[h] = x[h] . w[h]^T for every head."""
    g = torch.Generator().manual_seed(50 + M)
    for H, K, N in [(16, 128, 512), (3, 13, 37), (2, 100, 9)]:
        x, w = torch.randn(H, M, K, generator=g), torch.randn(H, N, K, generator=g)
        ref = torch.einsum("hmk,hnk->hmn", x.double(), w.double())
        assert (K_.f32_bmm(x, w).double() - ref).abs().max() < 1e-4 * K**0.5


@pytest.mark.parametrize("Q", [1, 5, 16, 20])  # query rows: one pass, two passes, a remainder
def test_mla_decode(Q, isa):
    """mla_decode: softmax(scale * (q_lat . kv^T + q_pe . pe^T)) . kv per sequence, over its first n[b]
    cached rows, with the cache passed as a strided view (rows of a longer allocation)."""
    g = torch.Generator().manual_seed(70 + Q)
    for B, r, dr, n in [(1, 512, 64, [300]), (3, 16, 8, [1, 7, 13]), (2, 48, 8, [40, 2]), (2, 80, 16, [25, 31])]:
        T_alloc = max(n) + 5
        kv = torch.randn(B, T_alloc, r, generator=g)
        pe = torch.randn(B, T_alloc, dr, generator=g)
        ql, qp = torch.randn(B, Q, r, generator=g), torch.randn(B, Q, dr, generator=g)
        used = max(n)
        out = K_.mla_decode(ql, qp, kv[:, :used], pe[:, :used], n, 0.07)
        for b in range(B):
            k, p = kv[b, : n[b]].double(), pe[b, : n[b]].double()
            probs = ((ql[b].double() @ k.T + qp[b].double() @ p.T) * 0.07).softmax(-1)
            assert (out[b].double() - probs @ k).abs().max() < 1e-4


@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("group", [8, 32, 64])
def test_int4_kernel(M, group, isa):
    g = torch.Generator().manual_seed(100 + M)
    for K, N in [(128, 37), (64, 5), (192, 130)]:
        x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        lay = L.Int4Linear(w, None, group)
        y = K_.int4_mm(x, lay.packed, lay.scales, lay.zeros, group, b)
        assert (y.double() - _ref(x, lay.dequantized(), b)).abs().max() < 1e-4 * K**0.5


@pytest.mark.parametrize("M", [1, 2, 8])
def test_moe_experts_grouped(M, isa):
    """moe_experts: per group (expert) w2 . (silu(gate) * up) over its rows, groups of 1..M rows."""
    g = torch.Generator().manual_seed(70 + M)
    D, I = 40, 24
    rows = [M, 1, 3, M, 2][: 2 + M % 4]
    w13 = [torch.randn(2 * I, D, generator=g) for _ in rows]
    w2 = [torch.randn(D, I, generator=g) for _ in rows]
    xs = torch.randn(sum(rows), D, generator=g)
    ref, r0 = [], 0
    for a, b, n in zip(w13, w2, rows, strict=True):
        h = xs[r0 : r0 + n].double() @ a.double().T
        ref.append((torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ b.double().T)
        r0 += n
    ys = K_.moe_experts(xs, w13, w2, rows, [], [])
    assert (ys.double() - torch.cat(ref)).abs().max() < 1e-4 * ys.abs().max()
    with pytest.raises(RuntimeError):
        K_.moe_experts(xs, w13, w2, [r + 1 for r in rows], [], [])  # rows must add up


def test_isa_selection():
    """The default is the best instruction set the CPU has; avx2 can always be forced."""
    assert "avx2" in kernels.isas() and K_.isa() in kernels.isas()
    before = K_.isa()
    assert K_.set_isa("avx2") == "avx2"
    K_.set_isa(before)
    if "avx512" not in kernels.isas():
        with pytest.raises(RuntimeError):
            K_.set_isa("avx512")


def test_describe_names_the_isa_or_why_not(monkeypatch):
    """describe() is the instruction set in use, or "unavailable: <reason>" where get() gives None."""
    assert kernels.describe() == K_.isa()
    for name in ("_tried", "_module", "_unavailable"):  # restored after the test
        monkeypatch.setattr(kernels, name, getattr(kernels, name))

    def fresh() -> str:
        kernels._tried, kernels._module = False, None
        return kernels.describe()

    monkeypatch.setenv("SEEKWEN_NO_KERNELS", "1")
    assert fresh() == "unavailable: disabled (SEEKWEN_NO_KERNELS is set)" and kernels.get() is None
    monkeypatch.delenv("SEEKWEN_NO_KERNELS")
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert fresh() == "unavailable: not x86 (aarch64)"


@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17])  # few-row kernels up to 16 rows; beyond: f32_gemm, BLAS
def test_layers_use_kernel_and_match_reference(rows):
    torch.manual_seed(rows)
    w, b = torch.randn(40, 52), torch.randn(40)
    x = torch.randn(rows, 52)
    for layer in (L.FastLinear(w, b), L.Int8Linear(w, b), L.Int4Linear(w[:, :48].contiguous(), b, 16)):
        xi = x[:, : layer.in_features]
        assert (layer(xi) - L.reference_forward(layer, xi)).abs().max() < 1e-4
    assert L.FastLinear(w, b).weight.shape == (40, 52)  # [out, in], no transposed copy


def test_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError):
        K_.f32_mm(torch.randn(2, 8), torch.randn(3, 9), None)  # K mismatch
    with pytest.raises(RuntimeError):
        K_.f32_mm(torch.randn(8, 2).t(), torch.randn(3, 8), None)  # not contiguous

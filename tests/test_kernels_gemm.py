"""The many-row fp32 GEMM (kernels.f32_gemm, csrc/gemm.h) against float64 references, with each
instruction set the CPU has: row counts around its panels of 16 / 32 rows (and few rows: any M is
correct), K odd (no tails exist for it, but the K blocks of GEMM_KC do), N not a multiple of the 12 / 6
weight rows of a tile, with and without bias; and FastLinear's forward above kernels.MAX_ROWS rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seekwen.fast import kernels
from seekwen.fast import linear as L

K_ = kernels.get()
pytestmark = pytest.mark.skipif(K_ is None, reason="no C++ compiler / no AVX2: kernels unavailable")
ROWS = [1, 17, 31, 32, 33, 64, 100, 512, 1000]
SHAPES = [(7, 13), (200, 1), (899, 1000), (896, 37), (2100, 13)]  # (K, N); 2100: three K blocks


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y within fp32 summation error of x . w^T + b: 1e-5 of sum_k |x||w| (+ |b|) per output."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if b is not None:
        ref, scale = ref + b.double(), scale + b.double().abs()
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_f32_gemm(M, bias, isa):
    g = torch.Generator().manual_seed(M)
    for K, N in SHAPES:
        if M * K * N > 3e8:
            continue
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g) if bias else None
        _check(K_.f32_gemm(x, w, b), x, w, b)


def test_f32_gemm_threads(isa):
    """Both ways of splitting the work: by weight rows (N large) and by panels of x (N below one tile)."""
    g = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for M, K, N in [(100, 64, 5), (70, 33, 1000), (32, 896, 25)]:
                x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
                _check(K_.f32_gemm(x, w, b), x, w, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [17, 20, 40])  # f32_mm below GEMM_ROWS, the GEMM from there
def test_fast_linear_many_rows(bias, rows, isa):
    """FastLinear above MAX_ROWS rows (f32_mm below GEMM_ROWS, then the GEMM) equals F.linear within 1e-5
    relative."""
    g = torch.Generator().manual_seed(40)
    w = torch.randn(300, 896, generator=g) * 0.05
    b = torch.randn(300, generator=g) if bias else None
    layer = L.FastLinear(w, b)
    x = torch.randn(2, rows // 2, 896, generator=g) if rows % 2 == 0 else torch.randn(rows, 896, generator=g)
    with torch.inference_mode():
        y, ref = layer(x), F.linear(x, w, b)
    assert y.shape == ref.shape
    assert ((y - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("blas_rows", [None, 128])
def test_fast_linear_blas_rows(blas_rows, monkeypatch):
    """From BLAS_ROWS rows (an Intel CPU's MKL) FastLinear is F.linear itself; without it the GEMM, within
    1e-5 relative of it."""
    monkeypatch.setattr(L, "BLAS_ROWS", blas_rows)
    g = torch.Generator().manual_seed(41)
    w, b = torch.randn(300, 896, generator=g) * 0.05, torch.randn(300, generator=g)
    layer = L.FastLinear(w, b)
    x = torch.randn(200, 896, generator=g)
    with torch.inference_mode():
        y, ref = layer(x), F.linear(x, w, b)
    if blas_rows is None:
        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-5
    else:
        assert torch.equal(y, ref)
    assert ("MKL" in L.describe_linear(layer)) == (blas_rows is not None) or kernels.get() is None


def _formats(w: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """(name, stored weight, block scales, the fp32 weight it decodes to) for gemm's widened formats."""
    out = [(f, w.to(t), None, w.to(t).float()) for f, t in (("bf16", torch.bfloat16), ("f16", torch.float16))]
    if w.shape[1] % L.QK == 0:
        q, d = L.quantize_q8_0(w)
        deq = (q.float().view(w.shape[0], -1, L.QK) * d.float()[..., None]).reshape(w.shape)
        out.append(("q8_0", q, d, deq))
        q, d = L.quantize_q4_0(w)
        deq = (q.float().view(w.shape[0], -1, L.QK) * d.float()[..., None]).reshape(w.shape)
        out.append(("q4_0", L.pack_q4_0(q), d, deq))
    return out


@pytest.mark.parametrize("M", [1, 17, 33, 100])
def test_gemm_widened_formats(M, isa):
    """gemm: bf16 / fp16 / Q8_0 / Q4_0 weights widened slice by slice equal x . (decoded W)^T."""
    g = torch.Generator().manual_seed(70 + M)
    for K, N in [(7, 13), (899, 37), (2112, 29), (896, 1000)]:  # 2112 = 66 blocks of 32: three K blocks
        x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        for _, stored, d, deq in _formats(w):
            _check(K_.gemm(x, stored, d, b), x, deq, b)


@pytest.mark.parametrize("fmt", ["bf16", "f16", "q8_0", "q4_0"])
def test_layers_many_rows_use_gemm(fmt, isa):
    """Above CHUNKED_ROWS rows the 16-bit and block layers' exact path (kernels.gemm) equals the product
    with their dequantized weight; describe_linear names it."""
    g = torch.Generator().manual_seed(80)
    w, b = torch.randn(70, 96, generator=g) * 0.05, torch.randn(70, generator=g)
    layer = L.make_linear(w, b, fmt)
    x = torch.randn(L.CHUNKED_ROWS + 9, 96, generator=g)
    with torch.inference_mode(), L.block_activations("fp32"):
        y = layer(x)
        assert f"else gemm[{isa}]" in L.describe_linear(layer)
    _check(y, x, layer.dequantized(), layer.bias)
    assert f"else f32_gemm[{isa}]" in L.describe_linear(L.FastLinear(w, b))

"""The weight formats of the fast path (bf16, f16, GGUF's Q8_0 / Q4_0) end to end: `kernels.mm` against a
float64 product with the dequantized weight for every format, 1..16 activation rows (one and two passes of
the register tiles), odd N and (where the format allows) odd K, bias on and off, with each instruction
set; ggml's quantization rules on hand-computed blocks; `from_blocks` (the GGUF loader's contract); the
layers against `reference_forward` (their dequantized weights through F.linear); the MoE experts call in
each format; and model-level checks (a tiny Qwen2, a Qwen2-MoE, a DeepSeek-V2 and the bundled model
prepared with each format: logits close to fp32, and equal, greedy included, to the same model run with
the dequantized weights in fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import seekwen
from seekwen.fast import GroupedExperts, kernels, prepare
from seekwen.fast import linear as L
from seekwen.model.moe import Experts
from seekwen.tools.common import bundled_model_path

K_ = kernels.get()
needs_kernels = pytest.mark.skipif(K_ is None, reason="no C++ compiler / no AVX2: kernels unavailable")
FORMATS = ["bf16", "f16", "q8_0", "q4_0"]
ODD = [(896, 37), (13, 5), (7, 3), (100, 9), (1, 4), (8, 1), (33, 24)]  # (K, N), unscaled formats
BLOCKED = [(896, 37), (32, 5), (64, 13), (96, 1), (4864, 12), (160, 25)]  # K % 32 == 0


def _layer(fmt: str, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    return L.make_linear(w, b, fmt)


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", range(1, 17))
@pytest.mark.parametrize("bias", [False, True])
def test_mm_every_format(fmt, M, bias, isa):
    g = torch.Generator().manual_seed(M)
    for K, N in BLOCKED if fmt.startswith("q") else ODD:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g) if bias else None
        layer = _layer(fmt, w, b)
        w_op, d = L.kernel_operands(layer)
        y = K_.mm(x, w_op, d, layer.bias)
        assert (y.double() - _ref(x, layer.dequantized(), b)).abs().max() < 1e-4 * K**0.5


@needs_kernels
def test_mm_rejects_bad_input():
    x = torch.randn(2, 64)
    q, d = L.quantize_q8_0(torch.randn(4, 64))
    with pytest.raises(RuntimeError, match="block scales"):
        K_.mm(x, q, None, None)  # Q8_0 codes without their scales
    with pytest.raises(RuntimeError, match="fp16"):
        K_.mm(x, q, d.float(), None)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        K_.mm(torch.randn(2, 32), q, d, None)  # K mismatch
    with pytest.raises(RuntimeError, match="no block scales"):
        K_.mm(x, torch.randn(4, 64), d, None)


# ---- ggml's quantization rules, on blocks worked out by hand --------------------------------------------


def test_q8_0_rules():
    """d = amax / 127, q = roundf(x / d): halves round away from zero (C's roundf), d is kept as fp16."""
    x = torch.zeros(2, 32)
    x[0, :5] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5])  # amax 127: d = 1, x / d exact halves
    x[1, :3] = torch.tensor([1.0, -0.25, 0.6])  # amax 1: d = 1/127
    q, d = L.quantize_q8_0(x.reshape(1, 64))
    assert d.dtype == torch.float16 and d.shape == (1, 2)
    assert q[0, :5].tolist() == [127, 3, -3, 1, -1] and not q[0, 5:32].any()
    assert q[0, 32:35].tolist() == [127, -32, 76]  # -31.75 -> -32, 76.2 -> 76
    assert d[0, 0].item() == 1.0 and d[0, 1].item() == torch.tensor(1 / 127).half().item()
    q0, d0 = L.quantize_q8_0(torch.zeros(1, 32))  # an all-zero block: d = 0, q = 0
    assert not q0.any() and d0.item() == 0.0


def test_q4_0_rules():
    """The first element of largest |x| with its sign gives d = max / -8; q = min(15, trunc(x / d + 8.5)) - 8."""
    x = torch.zeros(3, 32)
    x[0, :4] = torch.tensor([-8.0, 4.0, 7.6, -3.2])  # max -8: d = 1 -> q -8, 4, 7 (clamped from 8), -3
    x[1, :4] = torch.tensor([16.0, 3.0, -14.0, -15.0])  # max 16: d = -2 -> q -8, -1, 7, 7 (clamped)
    x[2, :2] = torch.tensor([-4.0, 4.0])  # a tie: the first one decides, d = 0.5
    q, d = L.quantize_q4_0(x.reshape(1, 96))
    assert d.dtype == torch.float16 and d[0].tolist() == [1.0, -2.0, 0.5]
    assert q[0, :4].tolist() == [-8, 4, 7, -3] and q[0, 32:36].tolist() == [-8, -1, 7, 7]
    assert q[0, 64:66].tolist() == [-8, 7] and int(q[0, 4:32].sum()) == 0  # zeros -> trunc(8.5) - 8 = 0
    y = torch.zeros(1, 32)
    y[0, 0] = 4.0
    assert L.quantize_q4_0(y)[1].item() == -0.5  # the same tie the other way round
    assert L.quantize_q4_0(torch.zeros(1, 32))[1].item() == 0.0


def test_q4_0_pack_order_is_ggufs():
    """Byte j of a block holds q[j] + 8 (low nibble) and q[j + 16] + 8 (high nibble)."""
    q = (torch.arange(64) % 16 - 8).to(torch.int8).reshape(1, 64)
    p = L.pack_q4_0(q)
    assert p.shape == (1, 32) and p.dtype == torch.uint8
    assert p[0, 0].item() == (0 | 0 << 4) and p[0, 3].item() == (3 | 3 << 4) and p[0, 16].item() == 0
    q2 = torch.randint(-8, 8, (5, 96), dtype=torch.int8)
    assert torch.equal(L.unpack_q4_0(L.pack_q4_0(q2)), q2)


@pytest.mark.parametrize("cls", [L.Q8_0Linear, L.Q4_0Linear])
def test_from_blocks_contract(cls):
    """weight == (q.view(N, K // 32, 32) * d[..., None]).reshape(N, K) for fp16-valued d (GGUF's)."""
    g = torch.Generator().manual_seed(1)
    N, K = 7, 96
    lo, hi = (-128, 128) if cls is L.Q8_0Linear else (-8, 8)
    q = torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int8)
    d = torch.rand(N, K // 32, generator=g).half().float()
    b = torch.randn(N, generator=g)
    layer = cls.from_blocks(q, d, b)
    assert torch.equal(layer.dequantized(), (q.view(N, K // 32, 32) * d[..., None]).reshape(N, K))
    assert torch.equal(layer.int_codes(), q)
    x = torch.randn(3, K, generator=g)
    with L.block_activations("fp32"):  # the exact path (the "q8" one: test_kernels_vnni)
        assert (layer(x) - L.reference_forward(layer, x)).abs().max() < 1e-4
    bound = L.q8_error_bound(x, layer.dequantized())
    assert ((layer(x) - L.reference_forward(layer, x)).abs() <= bound * 1.001 + 1e-4).all()
    with pytest.raises(ValueError, match="multiple of the block size"):
        cls.from_blocks(q[:, :40], d[:, :1])
    with pytest.raises(ValueError, match="d must be"):
        cls.from_blocks(q, d[:, :2])
    with pytest.raises(ValueError, match="int8"):
        cls.from_blocks(q.float(), d)
    if cls is L.Q4_0Linear:
        with pytest.raises(ValueError, match="-8..7"):
            cls.from_blocks(q * 2, d)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantization_error_per_format(fmt):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    err = (_layer(fmt, w, None).dequantized() - w).abs().max() / w.abs().max()
    assert 0 < err < {"bf16": 0.004, "f16": 0.0005, "q8_0": 0.01, "q4_0": 0.15}[fmt]


# ---- layers -------------------------------------------------------------------------------------------


@torch.inference_mode()
@pytest.mark.parametrize("fmt", FORMATS)
# x is [2, rows]: the kernels up to kernels.MAX_ROWS; block formats in 16-row chunks up to CHUNKED_ROWS; BLAS beyond
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 40])
def test_layers_equal_dequantized_reference(fmt, rows):
    torch.manual_seed(rows)
    w, b = torch.randn(40, 96), torch.randn(40)
    layer = _layer(fmt, w, b)
    x = torch.randn(2, rows, 96)
    with L.block_activations("fp32"):  # Q8_0 / Q4_0's exact path; their "q8" one: test_kernels_vnni
        y = layer(x)
        assert L.describe_linear(layer).startswith(fmt)
    assert y.shape == (2, rows, 40)
    assert (y - L.reference_forward(layer, x)).abs().max() < 1e-4 * 96**0.5
    assert L.weight_format(layer) == fmt


def test_block_formats_fall_back_to_bf16_for_odd_k():
    """in % 32 != 0 cannot be cut into blocks: that layer stays in bf16 (and says so)."""
    for fmt in ("q8_0", "q4_0"):
        layer = L.make_linear(torch.randn(8, 40), None, fmt)
        assert isinstance(layer, L.Half16Linear) and L.describe_linear(layer).startswith("bf16")
    with pytest.raises(ValueError, match="unknown quantization"):
        L.make_linear(torch.randn(8, 32), None, "q5_k")


@torch.inference_mode()
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_tokens", [1, 5, 16, 20])  # the fused kernel call up to 16 tokens, then per expert
def test_grouped_experts_in_each_format(fmt, n_tokens):
    torch.manual_seed(n_tokens)
    E, D, I, k = 8, 64, 96, 3
    ref = Experts(E, D, I)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.1)
    fast = GroupedExperts(ref, fmt)
    assert fast.use_kernels == (K_ is not None)
    x = torch.randn(n_tokens, D)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n_tokens)])
    w = torch.rand(n_tokens, k)
    deq = copy.deepcopy(ref)  # the stacked reference with the format's dequantized weights
    for e in range(E):
        w13 = fast.w13[e].dequantized()
        deq.w1.data[e], deq.w3.data[e] = w13[:I], w13[I:]
        deq.w2.data[e] = fast.w2[e].dequantized()
    with L.block_activations("fp32"):  # exact; with "q8", more than 16 tokens run the layers' qmm
        assert (fast(x, w, idx) - deq(x, w, idx)).abs().max() <= 1e-4
    ref = deq(x, w, idx)
    assert (fast(x, w, idx) - ref).abs().max() <= 0.02 * ref.abs().max()
    assert fmt in fast.describe()


# ---- models ---------------------------------------------------------------------------------------------


def _dequantized_twin(model: nn.Module) -> nn.Module:
    """The prepared model with every bf16 / f16 / q8_0 / q4_0 layer replaced by an fp32 FastLinear holding
    that layer's dequantized weight: the "dequantize, then run in fp32" reference."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (L.Half16Linear, L._BlockLinear)):
                setattr(module, name, L.FastLinear(child.dequantized(), child.bias))
    return twin


def _ids(vocab: int, B: int, S: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


COS = {"bf16": 0.9999, "f16": 0.99999, "q8_0": 0.9995, "q4_0": 0.95}  # logits vs fp32, cosine


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _check_model(plain: nn.Module, fmt: str) -> None:
    q = prepare(copy.deepcopy(plain), quantize=fmt)
    assert q.prepared == fmt
    ids = _ids(plain.cfg.vocab_size, 2, 12, seed=5)
    twin = _dequantized_twin(q)
    ref, want = plain(ids), twin(ids)
    # Q8_0 / Q4_0's exact path (fp32 activations): equal to dequantize-then-run, greedy decode included
    with L.block_activations("fp32"):
        got = q(ids)
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
        assert cos > COS[fmt] and (ref - got).abs().max() > 0  # close to fp32, and really in the format
        assert (want - got).abs().max() <= 1e-4
        a = q.generate(ids[:, :6], max_new_tokens=8, stop_at_eos=False)  # decode: the kernels, 2 rows
        b = twin.generate(ids[:, :6], max_new_tokens=8, stop_at_eos=False)
        assert torch.equal(a, b)
    if fmt in ("q8_0", "q4_0"):  # their default, int8 activations: within the activations' rounding
        _check_q8_activations(q(ids), want, ref, fmt, plain.cfg.moe is not None)
    rows = dict(seekwen.fast.plan(q))
    assert rows["quantization"] == fmt and fmt in rows["LM head"]


def _check_q8_activations(got: torch.Tensor, want: torch.Tensor, ref: torch.Tensor, fmt: str, moe: bool) -> None:
    """Logits with int8 activations (`got`) against dequantize-then-run (`want`). Every activation entering
    a block-format product is rounded to 8 bits with its block's absmax scale: the same relative step as
    Q8_0's own weight rounding (at most half of amax / 127), so the logits should move by about what
    quantizing the weights to Q8_0 moves them (`want` against fp32 `ref` for fmt q8_0). Measured on these
    tiny models: 0.6-1.5% relative (Q8_0's weight rounding: 0.4-1.6%); MoE models more (5.8% for
    deepseek_v2: a tiny random router's near-ties flip experts under any change, as in test_gguf). Bounds:
    3% (MoE 10%), and for q8_0 on dense models 2x the weight rounding's own error."""
    rel8 = _rel(got, want)
    assert 0 < rel8 < (0.1 if moe else 0.03), rel8
    if fmt == "q8_0" and not moe:
        assert rel8 <= 2 * _rel(want, ref), (rel8, _rel(want, ref))


@torch.inference_mode()
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["qwen2", "qwen2_moe", "deepseek_v2"])
def test_model_in_each_format(fmt, name, hub_checkpoint):
    _, folder = hub_checkpoint(name)
    _check_model(seekwen.load(folder, dtype=torch.float32, fast=False), fmt)


@torch.inference_mode()
@pytest.mark.parametrize("fmt", FORMATS)
def test_bundled_model_in_each_format(fmt):
    path = bundled_model_path()
    if not (path / "model.safetensors").is_file():
        pytest.skip("bundled model not built")
    _check_model(seekwen.load(path, dtype=torch.float32, fast=False), fmt)

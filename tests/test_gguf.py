"""GGUF in (seekwen/gguf/): the suite's tiny HF checkpoints written as GGUF the way llama.cpp's converter
writes them (tests/gguf_writer.py) and files the real converter wrote (tests/fixtures/gguf, see its
README), loaded with `seekwen.load` and compared with the HF checkpoint and transformers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402
from gguf_writer import tokenizer_keys, write_gguf  # noqa: E402
from hf_models import _YARN, SPECS, make_checkpoint  # noqa: E402
from test_compiled_step import decode_steps  # noqa: E402

import seekwen  # noqa: E402
from seekwen.fast.linear import block_activations  # noqa: E402
from seekwen.gguf import GGUFError  # noqa: E402
from seekwen.gguf.quant import blocks_q4_0, blocks_q8_0, dequantize_blocks, linear_from_blocks  # noqa: E402

# the converter cannot carry a YaRN mscale that differs from mscale_all_dim (llama.cpp assumes they are
# equal, as on every DeepSeek Hub config), nor a dense layer inside a Qwen2-MoE: these specs do as the Hub does
GGUF_SPECS = {
    "qwen2": SPECS["qwen2"],
    "qwen3": SPECS["qwen3"],
    "deepseek_v2": SPECS["deepseek_v2"],
    "deepseek_v2_no_q_lora": SPECS["deepseek_v2_no_q_lora"],
    "deepseek_v3": dataclasses.replace(SPECS["deepseek_v3"], rope=dict(_YARN, mscale=0.707, mscale_all_dim=0.707)),
    "qwen2_moe": dataclasses.replace(SPECS["qwen2_moe"], kwargs={**SPECS["qwen2_moe"].kwargs, "mlp_only_layers": []}),
    "qwen3_moe": SPECS["qwen3_moe"],
    # MLA with rank, nope and v of 32: attn_k_b / attn_v_b quantize (whole blocks per row)
    "deepseek_v2_mla32": dataclasses.replace(SPECS["deepseek_v2_no_q_lora"], kwargs={
        **SPECS["deepseek_v2_no_q_lora"].kwargs, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "v_head_dim": 32}),
}
FIXTURES = Path(__file__).parent / "fixtures" / "gguf"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (transformers model, HF folder, seekwen plain fp32 model), built once."""
    built = {}

    def get(name: str):
        if name not in built:
            hf, folder = make_checkpoint(GGUF_SPECS[name], tmp_path_factory.mktemp(name) / "hf")
            built[name] = hf, folder, seekwen.load(folder, dtype=torch.float32, fast=False)
        return built[name]

    return get


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    """gguf_file(name, kind) -> a GGUF of checkpoint `name` in `kind` (F32, F16, BF16, Q8_0, Q4_0), in a
    folder of its own (no tokenizer files beside it)."""
    made = {}

    def get(name: str, kind: str = "F32") -> Path:
        if (name, kind) not in made:
            _, folder, _ = checkpoint(name)
            out = tmp_path_factory.mktemp(f"{name}-{kind}") / f"{name}-{kind}.gguf"
            write_gguf(folder, out, kind)
            made[name, kind] = out
        return made[name, kind]

    return get


def ids_for(vocab: int = 160) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------------------
# F32: the same model as the HF checkpoint


@pytest.mark.parametrize("name", list(GGUF_SPECS))
def test_f32_gguf_equals_checkpoint_and_transformers(name, checkpoint, gguf_file):
    hf, _, ref = checkpoint(name)
    model = seekwen.load(gguf_file(name), fast=False)
    assert model.cfg.model_type == ref.cfg.model_type and model.dtype == torch.float32
    ids = ids_for()
    with torch.no_grad():
        got, want, theirs = model(ids), ref(ids), hf(ids).logits
    assert (got - want).abs().max() <= 1e-4
    assert (got - theirs).abs().max() <= 1e-4
    for p, q in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q)  # every weight bit for bit, the converter's splits undone


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_deepseek_moe_v1_permuted_qk_undone(kind, tmp_path):
    """DeepSeek-MoE v1 (`deepseek`): the one family whose converter permutes q/k rows (LLaMA-style, for
    ggml's rope); loading undoes it, on floats and on Q8_0 block rows alike."""
    from test_deepseek_v1 import write_deepseek_v1

    write_deepseek_v1(tmp_path / "hf")
    ref = seekwen.load(tmp_path / "hf", dtype=torch.float32, fast=False)
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", kind)
    model = seekwen.load(tmp_path / "m.gguf", fast=False)
    assert model.cfg.model_type == "deepseek"
    ids = ids_for(80)
    with torch.no_grad():
        want = ref(ids) if kind == "F32" else _dequantized_reference(ref, tmp_path / "m.gguf", permuted=True)(ids)
        assert (model(ids) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2", "deepseek_v3"])
def test_fast_path_on_gguf_equals_plain(name, gguf_file):
    path = gguf_file(name, "Q8_0")
    plain, fast = seekwen.load(path, fast=False), seekwen.load(path)
    ids = ids_for()
    with block_activations("fp32"):  # the exact path: equal to the plain (dequantized) model, greedy included
        with torch.no_grad():
            assert (fast(ids) - plain(ids)).abs().max() <= 1e-4
        a = plain.generate(ids[:1], max_new_tokens=8, temperature=0.0)
        b = fast.generate(ids[:1], max_new_tokens=8, temperature=0.0)
        assert torch.equal(a, b)
    with torch.no_grad():  # the default, int8 activations: within their rounding (see _check_q8_activations)
        _within_q8_activation_rounding(fast(ids), plain(ids), moe=plain.cfg.moe is not None)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_fast_path_runs_gguf_blocks_in_the_block_kernels(kind, gguf_file):
    """fast.prepare builds seekwen's Q8_0 / Q4_0 kernel layers from the file's blocks as they are (q/k/v and
    gate/up fused by stacking rows of blocks): every linear of the blocks is one, its dequantized weight is
    exactly the plain stand-in's, and the logits are the plain path's."""
    from seekwen.fast.linear import Q4_0Linear, Q8_0Linear

    cls = Q8_0Linear if kind == "Q8_0" else Q4_0Linear
    path = gguf_file("qwen2", kind)
    plain, fast = seekwen.load(path, fast=False), seekwen.load(path)
    blk, ref = fast.layers[0], plain.layers[0]
    assert isinstance(blk.attn.wqkv, cls) and isinstance(blk.attn.wo, cls)
    assert isinstance(blk.ffn.w13, cls) and isinstance(blk.ffn.w2, cls) and isinstance(fast.head, cls)
    want = torch.cat([ref.attn.wq.weight, ref.attn.wk.weight, ref.attn.wv.weight])
    assert torch.equal(blk.attn.wqkv.dequantized(), want)
    ids = ids_for()
    with torch.no_grad(), block_activations("fp32"):  # the exact path
        assert (fast(ids) - plain(ids)).abs().max() <= 1e-4
        assert (fast(ids[:1, :1]) - plain(ids[:1, :1])).abs().max() <= 1e-4  # one row: the kernels
    with torch.no_grad():  # int8 activations (kernels.qmm)
        _within_q8_activation_rounding(fast(ids), plain(ids), moe=False)
        _within_q8_activation_rounding(fast(ids[:1, :1]), plain(ids[:1, :1]), moe=False)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "BF16"])
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe"])
def test_fast_path_runs_gguf_experts_as_stored(name, kind, gguf_file):
    """Stacked routed experts (ffn_*_exps) in a Q8_0 / Q4_0 / BF16 file: the fast path's experts are built
    from the file's blocks or 16-bit weights as they are (gate/up fused by stacking rows), each equal to
    the plain model's dequantized expert, and the logits are the plain path's on the exact path."""
    from seekwen.fast import GroupedExperts
    from seekwen.fast.linear import Half16Linear, Q4_0Linear, Q8_0Linear

    cls = {"Q8_0": Q8_0Linear, "Q4_0": Q4_0Linear, "BF16": Half16Linear}[kind]
    path = gguf_file(name, kind)
    plain, fast = seekwen.load(path, dtype="float32", fast=False), seekwen.load(path, dtype="float32")
    moe = next(i for i, b in enumerate(fast.layers) if isinstance(getattr(b.ffn, "experts", None), GroupedExperts))
    got, ref = fast.layers[moe].ffn.experts, plain.layers[moe].ffn.experts
    assert set(ref.gguf_blocks) == {"w1", "w2", "w3"}
    for e in range(got.n_experts):
        assert isinstance(got.w13[e], cls) and isinstance(got.w2[e], cls)
        assert torch.equal(got.w13[e].dequantized(), torch.cat([ref.w1[e], ref.w3[e]]))
        assert torch.equal(got.w2[e].dequantized(), ref.w2[e])
    ids = ids_for()
    with torch.no_grad(), block_activations("fp32"):
        assert (fast(ids) - plain(ids)).abs().max() <= 1e-4
        assert (fast(ids[:1, :1]) - plain(ids[:1, :1])).abs().max() <= 1e-4  # one token: the kernels


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_fast_mla_runs_the_files_k_b_v_b_blocks(kind, gguf_file):
    """attn_k_b / attn_v_b as blocks: the fast path's absorbed products run per head on them (qmm_grouped,
    int8 activations), the plain path on their dequantized values; the exact mode still equals the plain
    path, and the default stays within the int8-activation rounding."""
    path = gguf_file("deepseek_v2_mla32", kind)
    plain, fast = seekwen.load(path, dtype="float32", fast=False), seekwen.load(path, dtype="float32")
    attn, ref = fast.layers[0].attn, plain.layers[0].attn
    assert set(ref.wkv_b.gguf_heads) == {"k_b", "v_b"} and len(attn.uk_heads) == attn.n_heads
    H, nope, r = attn.n_heads, attn.nope, attn.kv_lora_rank
    uk_t = torch.stack([la.dequantized() for la in attn.uk_heads])  # [H, r, nope]
    assert torch.equal(uk_t, ref.wkv_b.weight.view(H, -1, r)[:, :nope].transpose(1, 2))
    assert "qmm_grouped" in attn.describe()
    ids = ids_for()
    with torch.no_grad():
        for layer in (*fast.layers, *plain.layers):
            layer.attn.mode = "absorb"
        with block_activations("fp32"):
            assert (fast(ids) - plain(ids)).abs().max() <= 1e-4
        _within_q8_activation_rounding(fast(ids), plain(ids), moe=True)
        # the compiled decode step runs the same per-head blocks (qmm_grouped, called from C++)
        lens = torch.full((ids.shape[0],), ids.shape[1])
        python, _ = decode_steps(fast, ids, lens, 4, compiled=False)
        got, dec = decode_steps(fast, ids, lens, 4, compiled=True)
        assert dec.compiled is not None and (got - python).abs().max() <= 2e-3 * max(1.0, python.abs().max().item())
        a = plain.generate(ids[:1], max_new_tokens=6, temperature=0.0)
        b = fast.generate(ids[:1], max_new_tokens=6, temperature=0.0)
        assert a.shape == b.shape


def test_tied_head_of_a_quantized_gguf_runs_its_blocks():
    """A tied Qwen2 file from llama.cpp's converter: the LM head is token_embd's Q8_0 blocks on the fast
    path (not the dequantized fp32 table: 4x the bytes per token), the logits the plain path's."""
    from seekwen.fast.linear import Q8_0Linear

    path = FIXTURES / "qwen2" / "qwen2-q8_0.gguf"
    plain, fast = seekwen.load(path, fast=False), seekwen.load(path)
    assert plain.cfg.tie_word_embeddings and isinstance(fast.head, Q8_0Linear)
    assert torch.equal(fast.head.dequantized(), plain.embed.weight)
    ids = ids_for()
    with torch.no_grad(), block_activations("fp32"):
        assert (fast(ids) - plain(ids)).abs().max() <= 1e-4
    with torch.no_grad():
        _within_q8_activation_rounding(fast(ids), plain(ids), moe=False)


def _within_q8_activation_rounding(got: torch.Tensor, want: torch.Tensor, moe: bool) -> None:
    """The fast path's default for Q8_0 / Q4_0 blocks rounds activations to int8 blocks (llama.cpp's
    scheme): logits within 3% relative of dequantize-then-run, the bound
    test_kernels_formats._check_q8_activations explains; with a tiny random MoE router, whose near-ties flip
    experts under any change, 20% (measured: 11.9% on deepseek_v3; the per-layer bound is exact, see
    test_kernels_vnni)."""
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < (0.2 if moe else 0.03), rel


# ----------------------------------------------------------------------------------------------------
# 16-bit files: the checkpoint rounded to the file's type


def _rounded(ref, dtype: torch.dtype):
    """A copy of `ref` whose weights the converter would store in `dtype` (2-D and up, not the routers)
    rounded to it, computing in fp32."""
    import copy

    m = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2 and not name.endswith(("ffn.gate.weight", "shared_gate.weight")):
                p.copy_(p.to(dtype).float())
    return m


@pytest.mark.parametrize("kind", ["F16", "BF16"])
@pytest.mark.parametrize("name", ["qwen2", "deepseek_v3", "qwen3_moe"])
def test_half_gguf_equals_rounded_checkpoint(name, kind, checkpoint, gguf_file):
    _, _, ref = checkpoint(name)
    dtype = torch.float16 if kind == "F16" else torch.bfloat16
    own = seekwen.load(gguf_file(name, kind), fast=False)
    assert own.dtype == dtype  # the file's own type by default
    model = seekwen.load(gguf_file(name, kind), dtype="float32", fast=False)
    ids = ids_for()
    with torch.no_grad():
        assert (model(ids) - _rounded(ref, dtype)(ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_fast_path_runs_half_gguf_weights_as_stored(kind, gguf_file):
    """An F16 / BF16 file loaded in fp32: the fast path's linear layers (q/k/v and gate/up fused) keep the
    file's 16-bit weights (half the bytes per token of fp32, the same values), the logits the plain
    path's; a tied head (llama.cpp's qwen2 fixture) too."""
    from seekwen.fast.linear import Half16Linear

    dtype = torch.float16 if kind == "F16" else torch.bfloat16
    path = gguf_file("qwen2", kind)
    plain, fast = seekwen.load(path, dtype="float32", fast=False), seekwen.load(path, dtype="float32")
    blk, ref = fast.layers[0], plain.layers[0]
    for layer in (blk.attn.wqkv, blk.attn.wo, blk.ffn.w13, blk.ffn.w2, fast.head):
        assert isinstance(layer, Half16Linear) and layer.weight.dtype == dtype
    want = torch.cat([ref.attn.wq.weight, ref.attn.wk.weight, ref.attn.wv.weight])
    assert torch.equal(blk.attn.wqkv.dequantized(), want)
    ids = ids_for()
    with torch.no_grad(), block_activations("fp32"):  # the exact path (BF16's default rounds x to bf16)
        assert (fast(ids) - plain(ids)).abs().max() <= 1e-4
        assert (fast(ids[:1, :1]) - plain(ids[:1, :1])).abs().max() <= 1e-4  # one row: the kernels
    with torch.no_grad():  # the default: F16 exact; BF16 with bf16 activations where the CPU has AVX512-BF16
        got, want = fast(ids), plain(ids)
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999
    tied = FIXTURES / "qwen2" / "qwen2-f16.gguf"
    plain, fast = seekwen.load(tied, dtype="float32", fast=False), seekwen.load(tied, dtype="float32")
    assert plain.cfg.tie_word_embeddings and isinstance(fast.head, Half16Linear)
    assert torch.equal(fast.head.dequantized(), plain.embed.weight)
    with torch.no_grad():
        assert (fast(ids) - plain(ids)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------------
# Q8_0 / Q4_0: exact blocks, the same as dequantize-then-run, within the quantization's error


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_blocks_are_ggml_exact(kind):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(7, 96, generator=g) * torch.logspace(-3, 1, 7)[:, None]).numpy()
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)  # [7, 3 * block bytes]
    q, d = (blocks_q8_0 if kind == "Q8_0" else blocks_q4_0)(raw)
    assert q.dtype == torch.int8 and q.shape == (7, 96) and d.shape == (7, 3) and d.dtype == torch.float32
    lo, hi = (-127, 127) if kind == "Q8_0" else (-8, 7)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(dequantize_blocks(q, d), want)  # bit for bit ggml's values
    layer = linear_from_blocks(kind, q, d, torch.ones(7))
    x = torch.randn(3, 96, generator=g)
    assert torch.allclose(layer(x), x @ want.T + 1, atol=1e-5)
    # the format's own error bound: half a step of the block's scale (Q4_0: a whole step where the largest
    # weight's opposite end is clamped at +7), plus the scale's own fp16 rounding over the 127 or 8 steps
    step = d.abs().repeat_interleave(32, dim=1)  # (Q4_0 scales carry the sign of the largest weight)
    err = (want - torch.from_numpy(w)).abs()
    assert bool((err <= step * (0.5 + 127 / 2048 if kind == "Q8_0" else 1.0 + 8 / 2048) + 1e-7).all())


def _dequantized_reference(ref, path: Path, permuted: bool = False):
    """`ref` with every weight replaced by the file's dequantized tensor of the same name (gguf's own
    dequantizer): the dequantize-then-run model a block-quantized file must equal. permuted: q/k rows
    were permuted by the converter (DeepSeek-MoE v1): undone here with the converter's rule read backwards."""
    import copy

    from seekwen.gguf.names import our_name

    m = copy.deepcopy(ref)
    params = dict(m.named_parameters())
    reader = gguf.GGUFReader(str(path))
    with torch.no_grad():
        for t in reader.tensors:
            name = our_name(t.name)
            if name in params and t.tensor_type.name not in ("F32", "F16", "BF16"):  # any quantized type
                w = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))
                if permuted and ".attn_q." in t.name or permuted and ".attn_k." in t.name:
                    heads = ref.cfg.num_heads if ".attn_q." in t.name else ref.cfg.num_kv_heads
                    w = w.reshape(heads, -1, 2, w.shape[-1]).swapaxes(1, 2)
                params[name].copy_(w.reshape(params[name].shape))
            elif name in params and t.tensor_type.name == "F16":  # rows too short for blocks: F16
                params[name].copy_(params[name].half().float())
        for n, p in params.items():
            if n.endswith("attn.wkv_b.weight"):  # from attn_k_b / attn_v_b, F16 fallbacks here (rank 16)
                p.copy_(p.half().float())
    return m


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "deepseek_v3", "qwen2_moe"])
def test_block_quantized_gguf(name, kind, checkpoint, gguf_file):
    _, _, ref = checkpoint(name)
    path = gguf_file(name, kind)
    model = seekwen.load(path, fast=False)
    assert model.gguf_types.get(kind, 0) > 0
    ids = ids_for()
    with torch.no_grad():
        got, exact = model(ids), ref(ids)
        assert (got - _dequantized_reference(ref, path)(ids)).abs().max() <= 1e-4
    # within the format's error: relative logit error small for 8 bits, larger for 4 (and not zero); MoE
    # models are left out here (a tiny random router's near-ties flip experts under any weight change)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel > 0
    if ref.cfg.moe is None:
        assert rel < (0.02 if kind == "Q8_0" else 0.25), rel


def test_q8_0_linear_layers_are_built_from_blocks(gguf_file, monkeypatch):
    """Every Q8_0 weight of a linear layer goes through linear_from_blocks (the seam the block-quantized
    kernel layers plug into), with its bias; embeddings and stacked experts do not."""
    import seekwen.gguf.loader as loader

    seen = []

    def spy(kind, q, d, bias=None, dequantize=True):
        seen.append((kind, tuple(q.shape), bias is not None))
        return linear_from_blocks(kind, q, d, bias, dequantize)

    monkeypatch.setattr(loader, "linear_from_blocks", spy)
    model = seekwen.load(gguf_file("qwen2", "Q8_0"), fast=False)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(seen) == len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert all(k == "Q8_0" for k, _, _ in seen)
    assert sum(b for _, _, b in seen) == 2 * 3  # q/k/v biases (Qwen2)


# ----------------------------------------------------------------------------------------------------
# K-quants (Q4_K, Q5_K, Q6_K: Q4_K_M's types): dequantized with gguf's own dequantizer


def _random_kquant(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random valid blocks of a K-quant: random bits, the fp16 scales set to small finite values."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.01, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if kind == "Q6_K":
        raw[:, -2:] = scales[:, :2]  # d is the last field
    else:
        raw[:, :4] = scales  # d, dmin first
    return raw.reshape(rows, cols // block * size)


def test_k_quants_dequantize_like_ggml(tmp_path):
    shape = dict(num_key_value_heads=2, hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    spec = dataclasses.replace(SPECS["qwen2"], kwargs=shape)
    _, folder = make_checkpoint(spec, tmp_path / "hf")
    ref = seekwen.load(folder, dtype=torch.float32, fast=False)
    kinds = {"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_up.weight": "Q5_K", "blk.0.ffn_down.weight": "Q6_K",
             "output.weight": "Q6_K", "token_embd.weight": "Q4_K"}
    shapes = {"blk.0.attn_q.weight": (256, 256), "blk.0.ffn_up.weight": (256, 256), "blk.0.ffn_down.weight": (256, 256),
              "output.weight": (160, 256), "token_embd.weight": (160, 256)}
    raws = {n: _random_kquant(k, *shapes[n], seed=i) for i, (n, k) in enumerate(kinds.items())}
    out = tmp_path / "k.gguf"
    _write_with_raw(folder, out, raws, kinds)
    model = seekwen.load(out, fast=False)
    assert {model.gguf_types[k] for k in ("Q4_K", "Q5_K", "Q6_K")} == {2, 1}
    from seekwen.gguf.names import our_name

    params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, raw in raws.items():
            w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kinds[n]])
            params[our_name(n)].copy_(torch.from_numpy(w))
        ids = ids_for()
        assert (model(ids) - ref(ids)).abs().max() <= 1e-4


def _write_with_raw(folder: Path, out: Path, raws: dict[str, np.ndarray], kinds: dict[str, str]) -> None:
    """write_gguf, then the tensors named in `raws` replaced by those raw blocks (a file as llama-quantize
    leaves it: K-quants for some tensors, F32 for the rest)."""
    first = out.with_suffix(".f32.gguf")
    write_gguf(folder, first)
    src = gguf.GGUFReader(str(first))
    w = gguf.GGUFWriter(str(out), src.fields["general.architecture"].contents())
    _copy_metadata(src, w)
    for t in src.tensors:
        if t.name in raws:
            w.add_tensor(t.name, raws[t.name], raw_dtype=gguf.GGMLQuantizationType[kinds[t.name]])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    _finish(w)


def _copy_metadata(src, w, skip: tuple[str, ...] = ()) -> None:
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vt, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vt)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------------------------------
# tokenizer from the metadata == the HF tokenizer


SAMPLES = ["Hello world", "And God said, Let there be light: and there was light.", "  leading  spaces\n\nand\ttabs ",
           "numbers 1234567 and 3.14159, it's they're we'll I'd", "<|im_start|>user\nhi<|im_end|>",
           "ümlaut café 日本語テキスト 中文 한국어",
           "In the beginning God created the heaven and the earth.\n"]


def _train_tokenizer(folder: Path, pre: str) -> Path:
    """A small byte-level BPE with the named family's pre-tokenizer and special tokens, as tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from seekwen.gguf.tokenizer import PRE_TOKENIZERS

    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (Path(seekwen.__file__).parent / "assets" / "seekwen-kjv-v3" / "tokenizer.json").read_text()[:20000]
    tok.train_from_iterator([*SAMPLES * 3, text], trainer)
    tok.add_tokens(["<think>"])  # added, not special (Qwen3's)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}{{ m['content'] }}"
                                                                        "{% endfor %}"}))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("pre", ["qwen2", "deepseek-v3", "gpt-2", "deepseek-llm"])
def test_tokenizer_from_metadata_equals_hf(pre, tmp_path, checkpoint):
    from seekwen.hf.tokenizer import Tokenizer

    tj = _train_tokenizer(tmp_path / "tok", pre)
    hf_tok = Tokenizer.from_folder(tj.parent)
    _, folder, _ = checkpoint("qwen2")
    keys = tokenizer_keys(tj, pre)
    vocab = len(keys["tokens"])
    out = tmp_path / "gguf" / "m.gguf"
    out.parent.mkdir()
    write_gguf(folder, out, tokenizer=keys)
    model = seekwen.load(out, fast=False)  # (the model's vocabulary is 160; the tokenizer's is its own)
    tok = model.tokenizer
    assert tok is not None and tok.vocab_size == vocab
    for text in [*SAMPLES, "<think>x</think>"]:
        assert tok.encode(text) == hf_tok.encode(text), text
        ids = hf_tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == hf_tok.eos_token_id
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_tokenizer_beside_the_file_wins(tmp_path, gguf_file):
    from seekwen.hf.tokenizer import Tokenizer

    tj = _train_tokenizer(tmp_path / "m", "qwen2")
    shutil.copy(gguf_file("qwen2"), tmp_path / "m" / "model.gguf")
    model = seekwen.load(tmp_path / "m", fast=False)  # a folder with one .gguf
    assert model.path == tmp_path / "m" / "model.gguf"
    assert model.tokenizer.encode("Hello world") == Tokenizer.from_folder(tj.parent).encode("Hello world")


@pytest.fixture(scope="module")
def bundled_gguf(tmp_path_factory):
    """The bundled DeepSeek-V3-architecture model as a GGUF file (F32, its tokenizer as metadata only)."""
    from seekwen.tools.common import bundled_model_path

    folder = bundled_model_path()
    if not (folder / "model.safetensors").is_file():
        pytest.skip("bundled model not built")
    out = tmp_path_factory.mktemp("kjv") / "kjv.gguf"
    write_gguf(folder, out, "F32", tokenizer=tokenizer_keys(folder / "tokenizer.json", "gpt-2"))
    return folder, out


@pytest.mark.slow
def test_bundled_model_as_gguf_generates_the_same(bundled_gguf):
    """The same greedy text from `seekwen.load` of the file as from the checkpoint."""
    folder, path = bundled_gguf
    a = seekwen.load(folder, dtype="float32")
    b = seekwen.load(path)
    prompt = "In the beginning God created"
    assert b.tokenizer.encode(prompt) == a.tokenizer.encode(prompt)
    ids = torch.tensor([a.tokenizer.encode(prompt)])
    ga = a.generate(ids, max_new_tokens=24, temperature=0.0)
    gb = b.generate(ids, max_new_tokens=24, temperature=0.0)
    assert torch.equal(ga, gb)
    assert b.tokenizer.decode(gb[0].tolist()) == a.tokenizer.decode(ga[0].tolist())


@pytest.mark.slow
def test_cli_generate_takes_a_gguf_path(bundled_gguf, capsys):
    from seekwen.cli import main

    folder, path = bundled_gguf
    args = ["generate", "--max-new-tokens", "12", "--temperature", "0", "--quiet", "And God said"]
    assert main([*args, "--model", str(path)]) in (0, None)
    from_gguf = capsys.readouterr().out
    assert main([*args, "--model", str(folder)]) in (0, None)
    assert from_gguf == capsys.readouterr().out and from_gguf.startswith("And God said")


# ----------------------------------------------------------------------------------------------------
# malformed files -> clear errors


def _rewrite(src_path: Path, out: Path, drop: str | None = None, reshape: str | None = None,
             meta: dict | None = None, arch: str | None = None, raw_type: tuple[str, str] | None = None) -> Path:
    """A copy of a GGUF file with one thing wrong."""
    src = gguf.GGUFReader(str(src_path))
    w = gguf.GGUFWriter(str(out), arch or src.fields["general.architecture"].contents())
    _copy_metadata(src, w, skip=tuple(meta or ()))
    for key, value in (meta or {}).items():
        if value is not None:
            w.add_uint32(key, value)
    for t in src.tensors:
        if t.name == drop:
            continue
        data = np.array(t.data)
        if t.name == reshape:
            data = data[:-1]
        if raw_type and t.name == raw_type[0]:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[raw_type[1]]]
            data = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType[raw_type[1]])
            continue
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    _finish(w)
    return out


def test_clear_errors(tmp_path, gguf_file):
    good = gguf_file("qwen2")
    cases = [
        (_rewrite(good, tmp_path / "arch.gguf", arch="llama"), "unsupported GGUF architecture 'llama'"),
        (_rewrite(good, tmp_path / "drop.gguf", drop="blk.1.attn_k.weight"),
         "missing tensor(s): blk.1.attn_k.weight (for layers.1.attn.wk.weight)"),
        (_rewrite(good, tmp_path / "shape.gguf", reshape="blk.0.ffn_up.weight"),
         "tensor 'blk.0.ffn_up.weight' has shape (95, 64), expected (96, 64)"),
        (_rewrite(good, tmp_path / "type.gguf", raw_type=("blk.0.attn_q.weight", "IQ4_NL")),
         "has type IQ4_NL, which seekwen does not read"),
        (_rewrite(good, tmp_path / "meta.gguf", meta={"qwen2.block_count": None}),
         "required metadata key 'qwen2.block_count' is missing"),
        (_rewrite(good, tmp_path / "extra.gguf", meta={"qwen2.block_count": 1}), "unexpected tensor(s) for qwen2"),
    ]
    for path, message in cases:
        with pytest.raises(GGUFError) as e:
            seekwen.load(path, fast=False)
        assert message in str(e.value) and str(path) in str(e.value), str(e.value)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(GGUFError, match="not a readable GGUF file"):
            seekwen.load(path)
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(good, two / "a.gguf")
    shutil.copy(good, two / "b.gguf")
    with pytest.raises(GGUFError, match="expected one .gguf file in the folder, found 2"):
        seekwen.load(two)
    with pytest.raises(GGUFError, match="no such GGUF file"):
        seekwen.load(tmp_path / "missing.gguf")
    split = tmp_path / "m-00001-of-00002.gguf"
    shutil.copy(good, split)
    with pytest.raises(GGUFError, match="split GGUF files are not supported"):
        seekwen.load(split)


# ----------------------------------------------------------------------------------------------------
# files written by llama.cpp's own converter (tests/fixtures/gguf/README.md says how they were made)


def _fixture_cases() -> list[tuple[str, str]]:
    if not FIXTURES.is_dir():
        return []
    return sorted((d.name, f.name) for d in FIXTURES.iterdir() if d.is_dir() for f in d.glob("*.gguf"))


@pytest.mark.skipif(not _fixture_cases(), reason="no converter fixtures")
@pytest.mark.parametrize("family,file", _fixture_cases())
def test_real_converter_fixtures(family, file):
    from transformers import AutoModelForCausalLM

    from seekwen.hf.tokenizer import Tokenizer

    folder = FIXTURES / family
    hf_folder = folder / "hf"
    ref = seekwen.load(hf_folder, dtype=torch.float32, fast=False)
    model = seekwen.load(folder / file, dtype="float32", fast=False)
    ids = ids_for(ref.cfg.vocab_size)
    kind = file.rsplit("-", 1)[-1].removesuffix(".gguf").upper()
    with torch.no_grad():
        got, want = model(ids), ref(ids)
        if kind in ("F32", "F16"):  # the checkpoint's weights are fp16 values: both files are lossless
            assert (got - want).abs().max() <= 1e-4
            hf = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
            assert (got - hf(ids).logits).abs().max() <= 1e-4
        else:  # == dequantize-then-run; dense models also within the format's error
            assert (got - _dequantized_reference(ref, folder / file)(ids)).abs().max() <= 1e-4
            rel = ((got - want).norm() / want.norm()).item()
            # (a random tiny model has no redundancy: 4-bit blocks move its logits by ~25%)
            assert rel > 0 and (ref.cfg.moe is not None or rel < (0.02 if kind == "Q8_0" else 0.35)), rel
    tok = Tokenizer.from_folder(hf_folder)
    for text in SAMPLES:
        assert model.tokenizer.encode(text) == tok.encode(text), text


# ----------------------------------------------------------------------------------------------------
# seekwen bench --vs-llamacpp (CI has no llama.cpp: stand-ins print llama-bench's JSON and
# llama-batched-bench's JSONL exactly as those tools do)

FAKE_BENCH = """#!{python}
import json, sys
if "--version" in sys.argv:
    print("version: 1 (fake)"); sys.exit(0)
args = sys.argv
n = int(args[args.index("-n") + 1])
rows = [dict(n_prompt=int(p), n_gen=0, avg_ts=100.0 * (i + 1), stddev_ts=1.0, model_size=1)
        for i, p in enumerate(args[args.index("-p") + 1].split(","))]
rows.append(dict(n_prompt=0, n_gen=n, avg_ts=50.0, stddev_ts=1.0, model_size=1))
print(json.dumps(rows))
"""
FAKE_FAILING = """#!{python}
import sys
if "--version" in sys.argv:
    print("version: 1 (fake)"); sys.exit(0)
print("llama_model_load: error loading model: error loading model hyperparameters: key not found in model: "
      "deepseek2.attention.q_lora_rank", file=sys.stderr)
print("llama_bench: error: failed to load model", file=sys.stderr)
sys.exit(1)
"""
FAKE_BATCHED = """#!{python}
import json
for pl, speed in ((1, 40.0), (8, 160.0), (1, 41.0)):
    row = dict(pp=32, tg=4, pl=pl, n_kv=0, t_pp=0.1, speed_pp=1.0, t_tg=0.1, speed_tg=speed, t=0.2, speed=1.0)
    print(json.dumps(row))
"""


@pytest.mark.slow
def test_bench_vs_llamacpp(tmp_path, monkeypatch, capsys):
    import sys

    from seekwen.cli import main

    path = FIXTURES / "qwen2" / "qwen2-q8_0.gguf"
    args = ["bench", "--vs-llamacpp", str(path), "--decode-tokens", "4", "--repeats", "1"]
    monkeypatch.setenv("LLAMA_CPP_BIN", str(tmp_path / "none"))
    import os

    # no llama-bench on PATH either (the rest of PATH stays: the C++ kernels' build needs ninja from it)
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in dirs if not (Path(d) / "llama-bench").exists()))
    assert main(args) in (0, None)
    out = capsys.readouterr().out
    assert "llama.cpp not found" in out and "decode b1 (after 32)" in out and "seekwen / llama.cpp" not in out
    for name, text in (("llama-bench", FAKE_BENCH), ("llama-batched-bench", FAKE_BATCHED)):
        (tmp_path / name).write_text(text.format(python=sys.executable))
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("LLAMA_CPP_BIN", str(tmp_path))
    assert main(args) in (0, None)
    out = capsys.readouterr().out
    assert f"llama-bench -m {path} -t" in out and "-p 32,512 -n 4" in out and "version: 1 (fake)" in out
    b1 = next(x for x in out.splitlines() if "decode b1 (after 32)" in x)
    b8 = next(x for x in out.splitlines() if "decode b8 (after 32)" in x)
    assert "llama.cpp    40.00 tok/s" in b1 and "llama.cpp   160.00 tok/s" in b8 and "seekwen / llama.cpp" in b8
    assert "llama.cpp    50.00 tok/s" in next(x for x in out.splitlines() if x.strip().startswith("decode b1 "))
    assert "(llama.cpp " in out.splitlines()[-1]  # its roofline fraction
    # a file llama.cpp cannot load: its own reason, as a clear error (exit status 2), no traceback
    (tmp_path / "llama-bench").write_text(FAKE_FAILING.format(python=sys.executable))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "llama-bench failed on" in err and "key not found in model: deepseek2.attention.q_lora_rank" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name,kind", [("qwen2_moe", "Q4_0"), ("deepseek_v3", "Q8_0"), ("qwen2", "F16"),
                                       ("qwen3_moe", "BF16")])
def test_lean_load_fills_no_reference_copy_of_what_runs_as_stored(name, kind, gguf_file, monkeypatch):
    """The fast path's load (lean) copies nothing into the reference weights of layers and experts that run
    the file's blocks / 16-bit weights (those parameters stay untouched allocations, so a big quantized
    MoE file loads in about its own size), and computes what the plain load of the same file computes."""
    import seekwen.gguf.loader as loader

    copied = []
    copy = loader._copy
    monkeypatch.setattr(loader, "_copy", lambda f, params, param, t, src: (copied.append(param), copy(f, params, param,
                                                                                                     t, src)))
    path = gguf_file(name, kind)
    fast = seekwen.load(path, dtype="float32")
    big = [p for p in copied if ".experts." in p or p.endswith(("wq.weight", "wo.weight", "w1.weight", "w2.weight"))]
    assert not big, big
    assert not any(getattr(m, "weight_unloaded", False) or getattr(m, "unloaded", None) for m in fast.modules())
    copied.clear()
    plain = seekwen.load(path, dtype="float32", fast=False)
    assert any(".experts." in p for p in copied) or plain.cfg.moe is None  # the plain load fills them
    ids = ids_for()
    with torch.no_grad(), block_activations("fp32"):
        assert (fast(ids) - plain(ids)).abs().max() <= 1e-4


def test_weight_of_an_unloaded_layer_dequantizes_its_blocks():
    from seekwen.fast.linear import weight_of

    g = torch.Generator().manual_seed(5)
    q, d = torch.randint(-8, 8, (6, 64), generator=g, dtype=torch.int8), torch.rand(6, 2, generator=g)
    layer = linear_from_blocks("Q4_0", q, d, dequantize=False)
    assert layer.weight_unloaded and torch.equal(weight_of(layer), dequantize_blocks(q, d))
    half = torch.nn.Linear(64, 6, bias=False)
    half.gguf_blocks, half.weight_unloaded = ("BF16", torch.randn(6, 64).bfloat16(), None), True
    assert torch.equal(weight_of(half), half.gguf_blocks[1].float())

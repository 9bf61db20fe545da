"""fp8 e4m3 checkpoints with 128x128-block `weight_scale_inv` (the DeepSeek-V3/R1 release format):
`seekwen.load` dequantizes them to exactly the block-scaled values, and names a weight that lacks its scale."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import seekwen
from seekwen import CheckpointError

FP8_LINEAR = ("_proj.weight", "kv_a_proj_with_mqa.weight")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale = amax / 448, q = w / scale in e4m3; returns (q, scale_inv = scale)."""
    out_f, in_f = w.shape
    nb_o, nb_i = math.ceil(out_f / block), math.ceil(in_f / block)
    scale = torch.empty(nb_o, nb_i)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for a in range(nb_o):
        for b in range(nb_i):
            blk = w[a * block:(a + 1) * block, b * block:(b + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[a, b] = s
            q[a * block:(a + 1) * block, b * block:(b + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = q.float().clone()
    for a in range(scale.shape[0]):
        for b in range(scale.shape[1]):
            out[a * block:(a + 1) * block, b * block:(b + 1) * block] *= scale[a, b]
    return out


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_models import SPECS, Spec, make_checkpoint

    base = SPECS["deepseek_v3"]
    # a dense MLP 200 wide so gate/up ([200, 64]) and down ([64, 200]) span two 128-blocks
    spec = Spec("deepseek_v3_fp8", "deepseek_v3", dict(base.kwargs, intermediate_size=200), rope=base.rope,
                extra_json=base.extra_json)
    _, folder = make_checkpoint(spec, tmp_path_factory.mktemp("fp8"))
    ref = seekwen.load(folder, dtype=torch.float32, fast=False)
    f = folder / "model.safetensors"
    state = load_file(str(f))
    expected = {}
    for name in list(state):
        if name.endswith(FP8_LINEAR) and state[name].dim() == 2:
            q, s = quantize_fp8(state[name])
            state[name], state[name + "_scale_inv"] = q, s
            expected[name] = dequantize_ref(q, s)
    save_file(state, str(f), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, ref, expected


def test_fp8_block_scaled_weights_dequantize(fp8_checkpoint):
    folder, ref, expected = fp8_checkpoint
    model = seekwen.load(folder, dtype=torch.float32, fast=False)  # the reference modules' parameters
    params = dict(model.named_parameters())
    assert "model.layers.0.mlp.down_proj.weight" in expected
    assert load_file(str(folder / "model.safetensors"))["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    checks = {
        "model.layers.0.mlp.gate_proj.weight": params["layers.0.ffn.w1.weight"],
        "model.layers.0.mlp.down_proj.weight": params["layers.0.ffn.w2.weight"],
        "model.layers.0.self_attn.kv_b_proj.weight": params["layers.0.attn.wkv_b.weight"],
        "model.layers.1.self_attn.q_a_proj.weight": params["layers.1.attn.wq_a.weight"],
        "model.layers.1.mlp.experts.5.up_proj.weight": params["layers.1.ffn.experts.w3"][5],
        "model.layers.2.mlp.shared_experts.down_proj.weight": params["layers.2.ffn.shared.w2.weight"],
    }
    for name, p in checks.items():
        assert torch.equal(p.detach(), expected[name]), name
    # close to the unquantized weights (e4m3 keeps 3 mantissa bits), and the model still runs alike
    ref_w = dict(ref.named_parameters())["layers.0.ffn.w1.weight"]
    rel = ((params["layers.0.ffn.w1.weight"] - ref_w).abs().max() / ref_w.abs().max()).item()
    assert 0 < rel < 0.07
    ids = torch.tensor([[5, 9, 11, 40, 2]])
    with torch.no_grad():
        a, b = model(ids), ref(ids)
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.95  # routing may flip; still alike


def test_fp8_weight_without_scale(fp8_checkpoint, tmp_path):
    folder, _, _ = fp8_checkpoint
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight_scale_inv"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"fp8 tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has no "
                                              r"'model\.layers\.0\.mlp\.up_proj\.weight_scale_inv'"):
        seekwen.load(tmp_path)

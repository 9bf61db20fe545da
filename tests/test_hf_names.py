"""The one two-way name map (`seekwen.hf.names.NameMap`): every family's tiny checkpoint round-trips
checkpoint name -> our parameter -> checkpoint name and back; each rule list is unambiguous; the
tensor-parallel split dimensions follow DeepSeek-V3's `inference/model.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from seekwen.hf.families import FAMILIES, name_map, parse_config
from seekwen.hf.loader import read_config
from seekwen.hf.names import Placement
from seekwen.tools.see import meta_model

CONFIGS = Path(__file__).parent / "fixtures" / "configs"

QWEN_V1 = {"model_type": "qwen", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4,
           "num_hidden_layers": 2, "intermediate_size": 64, "seq_length": 64}


def _round_trip(cfg, checkpoint_names: set[str]) -> None:
    """Checkpoint -> ours -> checkpoint for every tensor, and ours -> checkpoint -> ours for every parameter."""
    names = name_map(cfg)
    params = dict(meta_model(cfg).named_parameters())
    for hf in checkpoint_names:
        if names.skip(hf):
            continue
        placements = names.our_name(hf)
        assert placements, f"{hf}: not a {cfg.model_type} tensor name"
        for pl in placements:
            assert pl.param in params, f"{hf} -> {pl.param}: no such parameter"
            assert names.hf_name(pl.param, pl.expert) == hf
    for pname, p in params.items():
        if pname == "head.weight" and cfg.tie_word_embeddings:
            continue
        for e in range(p.shape[0]) if names.stacked(pname) else [None]:
            hf = names.hf_name(pname, e)
            assert hf in checkpoint_names, f"{pname}[{e}] -> {hf}: not in the checkpoint"
            assert any(pl.param == pname and pl.expert == e for pl in names.our_name(hf))


def test_name_map_round_trip_on_every_tiny_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from hf_models import SPECS, make_checkpoint

    for spec in SPECS.values():
        _, folder = make_checkpoint(spec, tmp_path / spec.name)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            checkpoint = set(f.keys())
        _round_trip(read_config(folder)[2], checkpoint)


def test_name_map_round_trip_qwen_v1():
    cfg = parse_config(dict(QWEN_V1))
    names = name_map(cfg)
    checkpoint = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight",
                  "transformer.rotary_emb.inv_freq"}
    for i in range(2):
        p = f"transformer.h.{i}."
        checkpoint |= {p + n for n in ("ln_1.weight", "ln_2.weight", "attn.c_attn.weight", "attn.c_attn.bias",
                                       "attn.c_proj.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight")}
    _round_trip(cfg, checkpoint)
    # fused q/k/v: one checkpoint tensor, three equal chunks along dim 0
    assert names.our_name("transformer.h.1.attn.c_attn.bias") == tuple(
        Placement(f"layers.1.attn.{w}.bias", None, k, 3, 0) for k, w in enumerate(("wq", "wk", "wv")))
    assert names.our_name("transformer.h.0.mlp.w2.weight") == (Placement("layers.0.ffn.w1.weight"),)  # the gate
    assert names.hf_module("layers.0.attn.wk") == "transformer.h.0.attn.c_attn[k]"
    assert names.hf_module("layers") == "transformer.h"


def test_expert_names_both_layouts():
    cfg = parse_config(json.loads((CONFIGS / "qwen1.5-moe-a2.7b.json").read_text()))
    names = name_map(cfg)
    assert names.hf_name("layers.1.ffn.experts.w2", expert=3) == "model.layers.1.mlp.experts.3.down_proj.weight"
    assert names.our_name("model.layers.1.mlp.experts.3.down_proj.weight") == (
        Placement("layers.1.ffn.experts.w2", expert=3),)
    # transformers 5's fused 3D layout is read (gate and up halves along dim 1), never written
    assert names.our_name("model.layers.1.mlp.experts.gate_up_proj") == (
        Placement("layers.1.ffn.experts.w1", None, 0, 2, 1), Placement("layers.1.ffn.experts.w3", None, 1, 2, 1))
    assert names.hf_module("layers.1.ffn.experts") == "model.layers.1.mlp.experts"
    assert names.hf_module("layers.1.ffn.shared_gate") == "model.layers.1.mlp.shared_expert_gate"
    with pytest.raises(ValueError, match="needs an expert index"):
        names.hf_name("layers.1.ffn.experts.w2")


def test_layers_past_the_config_and_rotary_caches_are_skipped():
    cfg = parse_config(json.loads((CONFIGS / "deepseek-v3.json").read_text()))
    names = name_map(cfg)
    # the multi-token-prediction layer (num_nextn_predict_layers 1) is read as mtp.0, both ways ...
    assert not names.skip("model.layers.61.self_attn.kv_b_proj.weight")
    assert names.our_name("model.layers.61.self_attn.kv_b_proj.weight")[0].param == "mtp.0.block.attn.wkv_b.weight"
    assert names.our_name("model.layers.61.shared_head.head.weight")[0].param == "mtp.0.head.weight"
    assert names.hf_name("mtp.0.block.ffn.experts.w1", expert=7) == "model.layers.61.mlp.experts.7.gate_proj.weight"
    assert names.hf_name("mtp.0.eh_proj.weight") == "model.layers.61.eh_proj.weight"
    assert names.skip("model.layers.62.self_attn.kv_b_proj.weight")  # past the MTP layers
    # ... and skipped by a model built without it (seekwen.load(..., mtp=False))
    assert name_map(cfg.replace(num_mtp_layers=0)).skip("model.layers.61.self_attn.kv_b_proj.weight")
    assert names.skip("model.layers.3.self_attn.kv_b_proj.weight_scale_inv")
    assert not names.skip("model.layers.60.self_attn.kv_b_proj.weight")
    assert not names.skip("model.layers.0.self_attn.rel_bias.weight")  # unknown: unexpected, not skipped
    assert names.our_name("model.layers.0.self_attn.rel_bias.weight") is None


def test_each_family_has_its_own_names():
    """No family reads another family's tensors: the per-family lists are not one union."""
    qwen2 = name_map(parse_config(json.loads((CONFIGS / "qwen2.5-7b.json").read_text())))
    v3 = name_map(parse_config(json.loads((CONFIGS / "deepseek-v3.json").read_text())))
    assert qwen2.our_name("model.layers.0.mlp.gate.weight") is None
    assert qwen2.our_name("model.layers.0.self_attn.kv_b_proj.weight") is None
    assert v3.our_name("model.layers.0.self_attn.q_norm.weight") is None  # Qwen3's qk-norm
    assert v3.our_name("model.layers.0.mlp.shared_expert.up_proj.weight") is None  # Qwen2-MoE's spelling
    assert v3.hf_name("layers.0.attn.q_norm.weight") == "model.layers.0.self_attn.q_a_layernorm.weight"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rule_lists_are_unambiguous(family):
    """One checkpoint template per rule, and each of our parameters written by exactly one rule."""
    rules = FAMILIES[family].rules
    assert len({r.hf for r in rules}) == len(rules)
    written = [t for r in rules if r.write for t in r.ours]
    assert len(set(written)) == len(written)
    assert all(len(r.parts) in (0, len(r.ours)) for r in rules)


def test_tensor_parallel_split_dims():
    """Column-parallel (dim 0): q/k/v, MLA's wq_b and wkv_b, gate/up, embedding and head rows;
    row-parallel (dim 1): wo, w2 (their biases replicated); routed experts by expert index (dim 0 of the
    stack); replicated (None): norms, routers, MLA's wq_a and wkv_a."""
    v3 = name_map(parse_config(json.loads((CONFIGS / "deepseek-v3.json").read_text())))
    expect = {
        "embed.weight": 0, "head.weight": 0, "norm.weight": None, "layers.0.attn_norm.weight": None,
        "layers.0.attn.wq_a.weight": None, "layers.0.attn.q_norm.weight": None, "layers.0.attn.wq_b.weight": 0,
        "layers.0.attn.wkv_a.weight": None, "layers.0.attn.kv_norm.weight": None, "layers.0.attn.wkv_b.weight": 0,
        "layers.0.attn.wo.weight": 1, "layers.0.ffn.w1.weight": 0, "layers.0.ffn.w3.weight": 0,
        "layers.0.ffn.w2.weight": 1, "layers.3.ffn.gate.weight": None, "layers.3.ffn.gate.bias": None,
        "layers.3.ffn.experts.w1": 0, "layers.3.ffn.experts.w2": 0, "layers.3.ffn.shared.w1.weight": 0,
        "layers.3.ffn.shared.w2.weight": 1,
    }
    assert {n: v3.split_dim(n) for n in expect} == expect
    qwen2 = name_map(parse_config(json.loads((CONFIGS / "qwen1.5-moe-a2.7b.json").read_text())))
    attn = ("wq.weight", "wq.bias", "wk.bias", "wo.weight")
    assert [qwen2.split_dim(f"layers.0.attn.{n}") for n in attn] == [0, 0, 0, 1]
    assert qwen2.split_dim("layers.0.ffn.shared_gate.weight") is None
    qwen3 = name_map(parse_config({**QWEN_V1, "model_type": "qwen3", "attention_bias": True}))
    assert (qwen3.split_dim("layers.0.attn.wo.bias"), qwen3.split_dim("layers.0.attn.q_norm.weight")) == (None, None)
    qwen_v1 = name_map(parse_config(dict(QWEN_V1)))
    assert [qwen_v1.split_dim(f"layers.0.attn.{n}.weight") for n in ("wq", "wk", "wv", "wo")] == [0, 0, 0, 1]

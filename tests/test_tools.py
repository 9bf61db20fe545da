"""The "see inside" tools: trace, memory, rope, routes, context.

trace and memory run on the published config.json values of real models (tests/fixtures/configs):
parameter counts must land within 1% of the published totals, and KV-cache bytes per token are
computed by hand here. context and routes run on a tiny random DeepSeek-V3 checkpoint saved by
transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from seekwen.cli import main
from seekwen.hf.families import name_map
from seekwen.hf.names import Placement
from seekwen.tools.memory import build_report, parse_contexts
from seekwen.tools.rope_lab import build as build_rope
from seekwen.tools.see import count_params, meta_model, read_model_config
from seekwen.tools.trace import build_trace

CONFIGS = Path(__file__).parent / "fixtures" / "configs"

# (fixture, published total, published active, whether the published active count includes the input
# embedding). DeepSeek-V2/V3 quote active parameters without it (V3: "36.7B incl. 0.9B output head");
# deepseek-moe-16b and Qwen1.5-MoE quote them with it.
PUBLISHED = [
    ("deepseek-v3.json", 671e9, 37e9, False),
    ("deepseek-v2.json", 236e9, 21e9, False),
    ("deepseek-v2-lite.json", 15.7e9, 2.4e9, False),
    ("deepseek-moe-16b.json", 16.4e9, 2.8e9, True),
    ("qwen1.5-moe-a2.7b.json", 14.3e9, 2.7e9, True),
    ("qwen2.5-7b.json", 7.61e9, 7.61e9, True),
]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seekwen", *args], capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------------
# trace: parameter counts and shapes from config.json alone


@pytest.mark.parametrize("name,total,active,with_embedding", PUBLISHED)
def test_parameter_counts_match_published(name, total, active, with_embedding):
    t = build_trace(read_model_config(str(CONFIGS / name)), batch=1, seq_len=4)
    assert abs(t.total - total) / total < 0.01, f"{name}: {t.total:,} vs published {total:,.0f}"
    ours = t.active_with_embedding if with_embedding else t.active
    assert abs(ours - active) / active < 0.025, f"{name}: active {ours:,} vs published {active:,.0f}"


def test_active_parameters_by_hand_deepseek_v3():
    c = count_params(meta_model(read_model_config(str(CONFIGS / "deepseek-v3.json")).cfg))
    per_expert = 3 * 7168 * 2048
    assert c.routed == 58 * 256 * per_expert
    assert c.active == c.total - 58 * 256 * per_expert + 58 * 8 * per_expert - 129280 * 7168


def test_trace_shapes_and_collapsed_layers():
    t = build_trace(read_model_config(str(CONFIGS / "deepseek-v3.json")), batch=2, seq_len=16)
    rows = {r.name: r for r in t.rows}
    assert rows["embed"].outputs == "[2, 16, 7168]"
    assert rows["head"].outputs == "[2, 16, 129280]"
    assert rows["layers.0–2"].count == 3 and rows["layers.3–60"].count == 58
    assert rows["layers.3–60.attn.wkv_a"].outputs == "[2, 16, 576]"  # latent 512 + rope key 64
    assert rows["layers.3–60.attn.wkv_a"].hf == "model.layers.3–60.self_attn.kv_a_proj_with_mqa"
    assert rows["layers.3–60.ffn.gate"].outputs == "[32, 8] [32, 8]"  # weights and expert ids per token
    assert rows["layers.3–60.ffn.shared"].hf == "model.layers.3–60.mlp.shared_experts"
    assert rows["layers.3–60.ffn.experts"].params == 256 * 3 * 7168 * 2048
    t16 = build_trace(read_model_config(str(CONFIGS / "deepseek-moe-16b.json")), batch=2, seq_len=512)
    names = [r.name for r in t16.rows]
    assert "layers.0" in names and "layers.1–27" in names  # seed 000: MoE in 27 of 28 layers
    assert {r.name: r for r in t16.rows}["head"].outputs == "[2, 512, 102400]"


@pytest.mark.parametrize("name", [p[0] for p in PUBLISHED])
def test_hf_names_are_checkpoint_names(name):
    """Every non-expert weight's HF module name (as `trace` shows it) + '.weight' is the checkpoint tensor
    the family loads into that weight."""
    src = read_model_config(str(CONFIGS / name))
    cfg = src.cfg
    cfg = cfg.replace(num_layers=4, mlp_layers=cfg.mlp_layers[:4], sliding_window=cfg.sliding_window[:4])
    model = meta_model(cfg)
    names = name_map(cfg)
    for pname, _ in model.named_parameters():
        module, _, leaf = pname.rpartition(".")
        if ".experts" in pname or leaf == "bias":
            continue
        hf = names.hf_module(module) + "." + leaf
        assert names.our_name(hf) == (Placement(pname),), f"{pname} -> {hf} is not a {cfg.model_type} tensor name"


# ----------------------------------------------------------------------------------------------------
# memory: KV bytes per token by hand


KV_BY_HAND = {  # bf16 bytes per token, all layers
    "deepseek-v3.json": (512 + 64) * 61 * 2,  # MLA: latent + shared rope key
    "deepseek-v2-lite.json": (512 + 64) * 27 * 2,
    "deepseek-moe-16b.json": 2 * 16 * 128 * 28 * 2,  # MHA: k and v, 16 heads x 128
    "qwen2.5-7b.json": 2 * 4 * 128 * 28 * 2,  # GQA: 4 KV heads
    "qwen1.5-moe-a2.7b.json": 2 * 16 * 128 * 24 * 2,
}


@pytest.mark.parametrize("name,per_token", KV_BY_HAND.items())
def test_kv_bytes_per_token(name, per_token):
    src = read_model_config(str(CONFIGS / name))
    assert src.cfg.kv_bytes_per_token(2) == per_token  # the one formula (bench checks real caches against it)
    rep = build_report(src, [4096, 32768], batch=2, dtype=None)
    assert rep.kv_per_token == per_token
    assert rep.rows[0].kv_cache == 2 * 4096 * per_token
    assert rep.rows[1].kv_cache == 2 * 32768 * per_token


def test_memory_mla_vs_mha_and_seed_table():
    rep = build_report(read_model_config(str(CONFIGS / "deepseek-v3.json")), [4096, 131072], 1, "bfloat16")
    assert rep.kv_per_token_mha == 128 * (128 + 64 + 128) * 61 * 2  # decompressed: every head's k and v
    assert rep.weights == rep.params * 2
    r4k, r128k = rep.rows
    assert r4k.scores_head_dtype == 32 * 2**20  # seed 000 §6: 4K -> 32 MB per S x S fp16 matrix
    assert r128k.scores_head_dtype == 32 * 2**30  # 128K -> 32 GB
    assert r4k.scores_layer_dtype == 128 * 32 * 2**20  # a whole layer: every head
    assert r128k.flash_layer == 128 * 2 * 131072 * 4  # running max + sum per query row, fp32
    assert parse_contexts("4k, 32768") == [4096, 32768]


def test_memory_and_trace_cli_json_on_a_bare_config(capsys):
    assert main(["memory", str(CONFIGS / "qwen2.5-7b.json"), "--context", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_per_token"] == 57344
    assert main(["trace", str(CONFIGS / "qwen1.5-moe-a2.7b.json"), "--json", "--seq-len", "8"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["total"] - 14.3e9) / 14.3e9 < 0.01


# ----------------------------------------------------------------------------------------------------
# rope


def test_rope_lab_fast_and_slow_pairs(tmp_path):
    args = Namespace(model=str(CONFIGS / "deepseek-moe-16b.json"), train_len=None, factor=4.0, length=None,
                     methods="none,linear,ntk,yarn,dynamic,qwen")
    lab = build_rope(args)
    pairs = lab["pairs"]
    assert lab["training_length"] == 4096 and len(pairs) == 64
    first, last = pairs[0], pairs[-1]
    assert first["band"] == "fast" and math.isclose(first["wavelength"], 2 * math.pi)  # pair 0: inv_freq 1
    assert last["band"] == "slow" and last["wavelength"] > 4096
    assert [p["wavelength"] for p in pairs] == sorted(p["wavelength"] for p in pairs)
    for p in pairs:
        w = p["wavelength_by_method"]
        assert math.isclose(w["linear"], 4 * w["none"], rel_tol=1e-5)
    assert math.isclose(first["wavelength_by_method"]["ntk"], first["wavelength"], rel_tol=1e-6)
    assert math.isclose(first["wavelength_by_method"]["yarn"], first["wavelength"], rel_tol=1e-6)
    assert math.isclose(last["wavelength_by_method"]["yarn"], 4 * last["wavelength"], rel_tol=1e-5)
    png = tmp_path / "rope.png"
    assert main(["rope", str(CONFIGS / "deepseek-v3.json"), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------
# a tiny checkpoint with a tokenizer, for context and routes

TEXT = " ".join(
    f"In the beginning {w} made the {x}, and the {x} was {y}; and {w} saw that it was {y} in the {i}th day."
    for i, (w, x, y) in enumerate(
        [(w, x, y) for w in ("God", "the LORD", "Moses") for x in ("heaven", "earth", "light", "sea")
         for y in ("good", "void", "dark")] * 3
    )
)
T = 32  # the tiny model's max_position_embeddings, its training length


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-v3")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    cfg = DeepseekV3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=T, norm_topk_prob=True,
        tie_word_embeddings=False, initializer_range=0.3,  # large weights: positions visibly matter
    )
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(cfg).save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)
    return folder


def _logits(folder: Path, method: str, length: int, ids: torch.Tensor) -> torch.Tensor:
    import seekwen
    from seekwen.hf.loader import read_config
    from seekwen.tools.context import method_overrides

    _, _, cfg = read_config(folder)
    model = seekwen.load(folder, dtype="float32", config_overrides=method_overrides(method, cfg, length, T) or None)
    with torch.no_grad():
        return model(ids)[0]


def test_context_methods_change_the_computation(tiny):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (1, 2 * T))
    none = _logits(tiny, "none", 2 * T, ids)
    # at the training length every static factor is 1: linear, NTK and YaRN are exactly "none"
    for method in ("linear", "ntk", "yarn"):
        assert torch.allclose(_logits(tiny, method, T, ids), none, atol=1e-5), method

    def short_range_change(method: str) -> float:  # factor 2, first 8 positions
        return float((_logits(tiny, method, 2 * T, ids) - none)[:8].abs().mean())

    linear, ntk, yarn = short_range_change("linear"), short_range_change("ntk"), short_range_change("yarn")
    assert linear > 0.05  # interpolation squeezes every pair, the fast ones included
    assert ntk < 0.5 * linear and yarn < 0.6 * linear  # they keep the fast pairs: short range nearly unchanged
    for method in ("window", "logn"):  # identical up to the training length, different past it
        out = _logits(tiny, method, 2 * T, ids)
        assert torch.allclose(out[:T], none[:T], atol=1e-5), method
        assert (out[T:] - none[T:]).abs().max() > 1e-2, method


@pytest.mark.slow
def test_context_cli_at_small_sizes(tiny, tmp_path):
    png = tmp_path / "ctx.png"
    r = cli("context", str(tiny), "--text", str(tiny / "text.txt"), "--lengths", "32,64", "--tokens", "128",
            "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    ppl = res["ppl"]
    assert set(ppl) == {"none", "linear", "ntk", "dynamic", "yarn", "logn", "window"}
    assert res["n_tokens"] == 128
    for m in ("linear", "ntk", "yarn", "logn", "window"):  # no method acts within the training length
        assert math.isclose(ppl[m]["32"], ppl["none"]["32"], rel_tol=1e-5), m
    assert not math.isclose(ppl["linear"]["64"], ppl["none"]["64"], rel_tol=1e-4)
    assert set(res["by_position"]["none"]["64"]) == {"0–31", "32–63"}
    ratio = res["by_position_ratio"]
    assert math.isclose(ratio["none"]["32"]["0–31"], 1.0, rel_tol=1e-9)  # the baseline against itself
    assert math.isclose(ratio["window"]["64"]["0–31"], 1.0, rel_tol=1e-6)  # same tokens, same context
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_routes_on_a_tiny_moe(tiny, tmp_path):
    png = tmp_path / "heat.png"
    r = cli("routes", str(tiny), "--text", str(tiny / "text.txt"), "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    (layer,) = res["layers"]  # layer 0 is dense, layer 1 is MoE
    assert layer["layer"] == 1 and len(layer["load"]) == 4
    assert sum(layer["load"]) == layer["tokens"] * 2  # top-2: two assignments per token
    assert layer["tokens"] % T == 0
    assert 0 < layer["entropy_bits"] <= 2.0 + 1e-9 and layer["max_over_mean"] >= 1.0
    assert all(len(t) > 0 for t, load in zip(layer["top_tokens"], layer["load"], strict=True) if load)
    assert png.stat().st_size > 5_000


# ----------------------------------------------------------------------------------------------------
# help and errors


@pytest.mark.parametrize("command", ["trace", "memory", "rope", "routes", "context"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: seekwen {command}" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["trace", "/no/such/model"],
    ["memory", "/no/such/config.json"],
    ["rope", "/no/such/folder"],
    ["context", "/no/such/model", "--text", "x.txt"],
    ["routes", "/no/such/model", "--text", "x.txt"],
])
def test_missing_model_is_a_one_line_error(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seekwen {args[0]}: error: ") and len(err.strip().splitlines()) == 1, err


def test_unreadable_config_is_a_one_line_error(tmp_path, tiny, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    for args in (["trace", str(bad)], ["memory", str(tmp_path)], ["rope", str(bad)],
                 ["context", str(tiny), "--text", str(tmp_path / "missing.txt")],
                 ["routes", str(tmp_path), "--text", str(tiny / "text.txt")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error:" in err, err


@pytest.mark.slow
def test_errors_from_the_command_line_have_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3", "hidden_size": "big"}')
    for args in (["trace", "/no/such/model"], ["memory", str(tmp_path / "config.json")],
                 ["rope", "no-such-org/no-such-model-xyz"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

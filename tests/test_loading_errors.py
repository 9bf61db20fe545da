"""One test per bad input to `seekwen.load`, each checking the message names what is wrong (and the
file / tensor); plus the Hugging Face cache layout and offline hub ids it resolves. fp8 checkpoints: test_fp8.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import seekwen
from seekwen import CheckpointError, ConfigError

D, H, KV, V, I, L = 32, 4, 2, 64, 48, 2


def qwen2_config() -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": D, "intermediate_size": I,
        "num_attention_heads": H, "num_key_value_heads": KV, "num_hidden_layers": L, "vocab_size": V,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "sliding_window": 64, "max_window_layers": L, "bos_token_id": 0, "eos_token_id": 1,
    }


def qwen2_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hd = D // H
    w = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": torch.ones(D),
         "lm_head.weight": torch.randn(V, D, generator=g)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes = {
            "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
            "self_attn.q_proj.weight": (H * hd, D), "self_attn.q_proj.bias": (H * hd,),
            "self_attn.k_proj.weight": (KV * hd, D), "self_attn.k_proj.bias": (KV * hd,),
            "self_attn.v_proj.weight": (KV * hd, D), "self_attn.v_proj.bias": (KV * hd,),
            "self_attn.o_proj.weight": (D, H * hd),
            "mlp.gate_proj.weight": (I, D), "mlp.up_proj.weight": (I, D), "mlp.down_proj.weight": (D, I),
        }
        for name, shape in shapes.items():
            w[p + name] = torch.randn(*shape, generator=g) * 0.1
    return w


def write(folder: Path, config: dict | str | None = None, weights: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = qwen2_config() if config is None else config
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    save_file(qwen2_weights() if weights is None else weights, str(folder / "model.safetensors"))
    return folder


def test_good_checkpoint_loads(tmp_path):
    model = seekwen.load(write(tmp_path), dtype=torch.float32)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, V)


def test_unknown_model_type(tmp_path):
    cfg = {**qwen2_config(), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model_type 'llama' \(seekwen runs: deepseek,"):
        seekwen.load(write(tmp_path, cfg))


def test_config_not_json(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        seekwen.load(write(tmp_path, '{"model_type": "qwen2", "hidden_size": 32,'))


def test_config_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object"):
        seekwen.load(write(tmp_path, "[1, 2, 3]"))


def test_config_missing_required_field(tmp_path):
    cfg = qwen2_config()
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match=r"config\.json: required field 'hidden_size' is missing"):
        seekwen.load(write(tmp_path, cfg))


@pytest.mark.parametrize("value", ["32", 32.5, None, True])
def test_config_wrong_type(tmp_path, value):
    cfg = {**qwen2_config(), "num_hidden_layers": value}
    msg = "is missing" if value is None else "must be an integer"
    with pytest.raises(ConfigError, match=rf"config\.json: .*'num_hidden_layers' {msg}"):
        seekwen.load(write(tmp_path, cfg))


def test_config_wrong_type_in_rope_scaling(tmp_path):
    cfg = {**qwen2_config(), "rope_scaling": "yarn"}
    with pytest.raises(ConfigError, match=r"'rope_scaling'/'rope_parameters' must be an object, got 'yarn'"):
        seekwen.load(write(tmp_path, cfg))


def test_missing_shard(tmp_path):
    w = qwen2_weights()
    names = sorted(w)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(qwen2_config()))
    save_file({n: w[n] for n in names[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"metadata": {"total_size": 0}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: missing shard file\(s\): "
                                              r"model-00002-of-00002\.safetensors"):
        seekwen.load(tmp_path)
    # with the shard present it loads
    save_file({n: w[n] for n in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    seekwen.load(tmp_path, dtype=torch.float32)


def test_truncated_safetensors(tmp_path):
    folder = write(tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or corrupt safetensors file"):
        seekwen.load(folder)


def test_garbage_safetensors(tmp_path):
    folder = write(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or corrupt safetensors file"):
        seekwen.load(folder)


def test_wrong_shape(tmp_path):
    w = qwen2_weights()
    w["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(D, D)  # 4 KV heads' worth instead of 2
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj"
                                              r"\.weight' has shape \(32, 32\), expected \(16, 32\)"):
        seekwen.load(write(tmp_path, weights=w))


def test_missing_weight(tmp_path):
    w = qwen2_weights()
    del w["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing weight\(s\): model\.layers\.0\.mlp\.up_proj\.weight "
                                              r"\(for layers\.0\.ffn\.w3\.weight\)"):
        seekwen.load(write(tmp_path, weights=w))


def test_missing_expert(tmp_path):
    cfg = {**qwen2_config(), "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
           "decoder_sparse_step": 1, "mlp_only_layers": [0]}
    w = qwen2_weights()
    p = "model.layers.1.mlp."
    for n in ("gate_proj", "up_proj", "down_proj"):
        del w[p + n + ".weight"]
    for e in range(4):
        w[p + f"experts.{e}.gate_proj.weight"] = torch.zeros(16, D)
        w[p + f"experts.{e}.up_proj.weight"] = torch.zeros(16, D)
        if e != 2:
            w[p + f"experts.{e}.down_proj.weight"] = torch.zeros(D, 16)
    for n, shape in (("gate_proj", (24, D)), ("up_proj", (24, D)), ("down_proj", (D, 24))):
        w[p + f"shared_expert.{n}.weight"] = torch.zeros(*shape)
    w[p + "shared_expert_gate.weight"] = torch.zeros(1, D)
    w[p + "gate.weight"] = torch.zeros(4, D)
    with pytest.raises(CheckpointError, match=r"missing weight\(s\): model\.layers\.1\.mlp\.experts\.2\.down_proj"
                                              r"\.weight \(for layers\.1\.ffn\.experts\.w2\[2\]\)$"):
        seekwen.load(write(tmp_path, cfg, w))


def test_unexpected_weight(tmp_path):
    w = qwen2_weights()
    w["model.layers.0.self_attn.rel_bias.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected weight\(s\) for qwen2: "
                                              r"model\.layers\.0\.self_attn\.rel_bias\.weight"):
        seekwen.load(write(tmp_path, weights=w))


class _Trap:
    """Unpickling this creates a file: proof that a loader unpickled the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_folder_is_refused_and_never_unpickled(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(qwen2_config()))
    marker = tmp_path / "unpickled"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Trap(marker)}, f)
    with pytest.raises(CheckpointError, match=r"only pickle weights \(\.bin/\.pt\) found; seekwen loads safetensors"):
        seekwen.load(tmp_path)
    assert not marker.exists()


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(qwen2_config()))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights found"):
        seekwen.load(tmp_path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope/deeper: no such checkpoint folder"):
        seekwen.load(tmp_path / "nope" / "deeper")


def test_folder_without_config(tmp_path):
    save_file(qwen2_weights(), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no config\.json in this folder"):
        seekwen.load(tmp_path)


def _hf_cache_entry(root: Path, repo: str = "org/tiny") -> Path:
    """A Hugging Face hub cache entry as huggingface_hub lays it out: models--org--name with a ref."""
    entry = root / ("models--" + repo.replace("/", "--"))
    write(entry / "snapshots" / "abc123")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    return entry


def test_hf_cache_folder_and_offline_hub_id(tmp_path, monkeypatch):
    entry = _hf_cache_entry(tmp_path / "hub")
    assert seekwen.resolve(entry) == entry / "snapshots" / "abc123"
    ids = torch.tensor([[1, 2, 3]])
    reference = seekwen.load(entry / "snapshots" / "abc123", dtype=torch.float32)(ids)
    torch.testing.assert_close(seekwen.load(entry, dtype=torch.float32)(ids), reference)
    # a hub id is served from the local cache without network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    torch.testing.assert_close(seekwen.load("org/tiny", dtype=torch.float32)(ids), reference)
    with pytest.raises(CheckpointError, match="org/missing"):
        seekwen.load("org/missing")

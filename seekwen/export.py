"""Save a seekwen `Transformer` as a standard Hugging Face checkpoint: the reverse of `families.py`.

Each of our parameter names is mapped back through the family's weight rules to the name the Hub
uses; stacked experts [E, ...] are split into one tensor per expert (`mlp.experts.{e}.gate_proj.weight`),
as DeepSeek and Qwen publish them. The config.json written is the model's own (raw) HF config with the
fields training may change (vocab size, dtype, special token ids) brought up to date.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .families import FAMILIES, MTP_OWN, Rule, first_match, template_regex
from .model.transformer import Transformer

ARCHITECTURES = {name: fam.architectures[0] for name, fam in FAMILIES.items()}


def _reverse_rules(cfg: ModelConfig) -> list[Rule]:
    """The weight rules that apply when writing this config: one HF name per parameter."""
    if cfg.model_type == "qwen":
        raise ConfigError("exporting Qwen (v1) checkpoints is not supported; use a qwen2/qwen3 config to train")
    rules = []
    for rule in FAMILIES[cfg.model_type].rules:
        if len(rule.ours) != 1 or rule.hf.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue  # fused layouts: we write the per-expert Hub layout
        if cfg.mla is not None and rule.hf.endswith("self_attn.q_norm.weight"):
            continue  # MLA's q_norm is q_a_layernorm
        if cfg.mla is None and "q_a_" in rule.hf:
            continue
        qwen = cfg.model_type.startswith("qwen")
        if ("shared_experts." in rule.hf and qwen) or ("shared_expert." in rule.hf and not qwen):
            continue
        rules.append(rule)
    return rules


def to_hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (contiguous CPU tensors, optionally cast to `dtype`;
    the router bias stays fp32)."""
    cfg = model.cfg
    rules = [(r, template_regex(r.ours[0])) for r in _reverse_rules(cfg)]
    out: dict[str, torch.Tensor] = {}
    # remove_duplicate=False: MTP layers trained with the main embedding and head tied are written as
    # the copies the Hub layout has (model.layers.{L}.embed_tokens, shared_head.head)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "head.weight" and cfg.tie_word_embeddings:
            continue
        t = p.detach().to("cpu")
        if dtype is not None and not name.endswith("gate.bias"):
            t = t.to(dtype)
        for hf_name, tensor in _hf_tensors(name, t, rules, cfg):
            out[hf_name] = tensor.contiguous()
    return out


def _hf_tensors(name: str, t: torch.Tensor, rules: list, cfg: ModelConfig):
    """(Hub name, tensor) pairs for our parameter `name`: stacked experts split per expert; MTP layer k
    (`mtp.{k}.*`) written as decoder layer L + k, as DeepSeek-V3 ships it."""
    prefix = ""
    if name.startswith("mtp."):
        k, rest = name.split(".", 2)[1:]
        prefix = f"model.layers.{cfg.num_layers + int(k)}."
        own = {ours: hf for hf, ours in MTP_OWN.items()}
        if rest in own:
            return [(prefix + own[rest], t)]
        if not rest.startswith("block."):
            raise ConfigError(f"no Hugging Face name for parameter '{name}' ({cfg.model_type})")
        name = "layers.0." + rest.removeprefix("block.")
    hit = first_match(rules, name)
    if hit is None:
        raise ConfigError(f"no Hugging Face name for parameter '{name}' ({cfg.model_type})")
    rule, groups = hit
    if "{e}" in rule.hf:
        names, tensors = [rule.hf.format(e=e, **groups) for e in range(t.shape[0])], list(t)
    else:
        names, tensors = [rule.hf.format(**groups)], [t]
    if prefix:
        names = [prefix + n.removeprefix("model.layers.0.") for n in names]
    return list(zip(names, tensors, strict=True))


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype | None = None, **updates) -> dict:
    """The config.json to write: the model's HF config with vocab size, dtype and `updates` applied."""
    raw = dict(cfg.raw)
    raw["model_type"] = cfg.model_type
    raw["architectures"] = [ARCHITECTURES[cfg.model_type]]
    raw["vocab_size"] = cfg.vocab_size
    if cfg.model_type == "deepseek_v3":
        raw["num_nextn_predict_layers"] = cfg.num_mtp_layers
    name = str(dtype or cfg.dtype).replace("torch.", "")
    raw["torch_dtype"] = name
    raw.pop("dtype", None)
    raw.update(updates)
    return raw


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_hf(model: Transformer, folder: str | os.PathLike, dtype: torch.dtype | None = None, **config_updates) -> Path:
    """Write config.json + model.safetensors into `folder` (created if needed). Loadable by
    `seekwen.load(folder)` and by transformers' `AutoModelForCausalLM.from_pretrained(folder)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model, dtype)
    _write_atomic(folder / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = to_hf_config(model.cfg, dtype or model.dtype, **config_updates)
    _write_atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder

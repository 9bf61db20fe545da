"""Save a seekwen `Transformer` as a standard Hugging Face checkpoint: the reverse of the loader.

Each of our parameter names is mapped back through the family's `NameMap` to the name the Hub uses;
stacked experts [E, ...] are split into one tensor per expert (`mlp.experts.{e}.gate_proj.weight`), as
DeepSeek and Qwen publish them. The config.json written is the model's own (raw) HF config with the
fields training may change (vocab size, dtype, special token ids) brought up to date.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ConfigError, ModelConfig
from ..model.transformer import Transformer
from .families import FAMILIES, name_map

ARCHITECTURES = {name: fam.architectures[0] for name, fam in FAMILIES.items()}


def to_hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (contiguous CPU tensors, optionally cast to `dtype`;
    the router bias stays fp32). Names come from the family's `NameMap`; stacked experts are written one
    tensor per expert."""
    cfg = model.cfg
    if cfg.model_type == "qwen":
        raise ConfigError("exporting Qwen (v1) checkpoints is not supported; use a qwen2/qwen3 config to train")
    names = name_map(cfg)
    out: dict[str, torch.Tensor] = {}
    # remove_duplicate=False: MTP layers trained with the main embedding and head tied are written as the
    # copies the Hub layout has (model.layers.{L}.embed_tokens, shared_head.head)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "head.weight" and cfg.tie_word_embeddings:
            continue
        t = p.detach().to("cpu")
        if id(p) in seen:  # a tied copy: its own storage (safetensors refuses shared tensors)
            t = t.clone()
        seen.add(id(p))
        if dtype is not None and not name.endswith("gate.bias"):
            t = t.to(dtype)
        if names.stacked(name):
            for e in range(t.shape[0]):
                out[names.hf_name(name, expert=e)] = t[e].contiguous()
        else:
            out[names.hf_name(name)] = t.contiguous()
    return out


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

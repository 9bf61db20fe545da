"""Shared helpers for the "see inside" tools (trace, memory, rope, routes, context): read a config
without weights, build a model on the meta device, and count parameters (total and active per token).
Hugging Face module names come from the family's name map (`seekwen.hf.families.name_map`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..hf.families import FAMILIES, parse_config
from ..hf.loader import CheckpointError, read_config, resolve
from .common import model_path

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def one_line_errors(func: Callable[..., int]) -> Callable[..., int]:
    """CLI entry points: an error message that spans lines (e.g. from huggingface_hub) becomes one line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            return func(*args, **kwargs)
        except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
            text = " ".join(str(e).split())
            if text == str(e):
                raise
            raise type(e)(text) from e

    return wrapper


@dataclass
class Source:
    cfg: ModelConfig
    raw: dict
    where: str  # the config.json path, for messages


def read_model_config(arg: str | None) -> Source:
    """A ModelConfig from a checkpoint folder, an HF cache folder, a hub id or a bare config.json path."""
    path = Path(model_path(arg)).expanduser()
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e})") from e
        return Source(parse_config(raw, str(path)), raw, str(path))
    if not path.exists() and _looks_like_hub_id(str(arg)):
        return read_model_config(hub_config(str(arg)))  # config.json only: never the weights
    folder = resolve(model_path(arg))
    raw, _, cfg = read_config(folder)
    return Source(cfg, raw, str(folder / "config.json"))


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~"))


def hub_config(repo_id: str) -> str:
    """The path of a hub model's config.json (from the local cache when there, else downloaded alone)."""
    from huggingface_hub import snapshot_download

    for local in (True, False):
        try:
            folder = snapshot_download(repo_id, allow_patterns=["config.json"], local_files_only=local)
        except Exception as e:  # offline, unknown repo, gated ...
            if not local:
                raise CheckpointError(f"{repo_id}: not a local path, and its config.json could not be fetched "
                                      f"from the Hugging Face hub ({type(e).__name__})") from e
            continue
        if (Path(folder) / "config.json").is_file():
            return str(Path(folder) / "config.json")
    raise CheckpointError(f"{repo_id}: the hub repository has no config.json")


def architecture(src: Source) -> str:
    archs = src.raw.get("architectures") or []
    if archs:
        return str(archs[0])
    fam = FAMILIES.get(src.cfg.model_type)
    return fam.architectures[0] if fam else src.cfg.model_type


def emit(args, data: object, print_table: Callable[[], None], draw: Callable[[str], None] | None = None) -> int:
    """The tools' common ending: JSON (`--json`) or a table on the terminal, then `--plot FILE` if the
    command has one."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_table()
    if draw is not None and args.plot:
        draw(args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype '{name}' (use one of: {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[name]


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The model with no storage: shapes and parameter counts only. The decoder itself: DeepSeek-V3's
    multi-token-prediction layer is not counted (as in the published 671B), nor traced."""
    from ..model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.replace(num_mtp_layers=0))
    return model


# ----------------------------------------------------------------------------------------------------
# parameter counts


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class ParamCounts:
    total: int
    embed: int
    head: int  # 0 when tied to the embedding
    routed: int  # all routed experts, all MoE layers
    routed_active: int  # top_k routed experts per MoE layer
    by_kind: dict[str, int]

    @property
    def active(self) -> int:
        """Parameters one token touches, without the input embedding (a lookup, not a matmul): the
        convention of DeepSeek's "37B activated" and Qwen's "A2.7B"."""
        return self.total - self.routed + self.routed_active - self.embed

    @property
    def active_with_embedding(self) -> int:
        return self.active + self.embed


def count_params(model: nn.Module) -> ParamCounts:
    cfg: ModelConfig = model.cfg
    kinds: dict[str, int] = {"embedding": n_params(model.embed), "attention": 0, "norms": 0, "dense MLP": 0,
                             "router": 0, "routed experts": 0, "shared experts": 0, "final norm": n_params(model.norm)}
    routed = routed_active = 0
    for layer in model.layers:
        kinds["attention"] += n_params(layer.attn)
        kinds["norms"] += n_params(layer.attn_norm) + n_params(layer.ffn_norm)
        ffn = layer.ffn
        if hasattr(ffn, "experts"):
            per_expert = n_params(ffn.experts) // ffn.experts.w1.shape[0]
            routed += n_params(ffn.experts)
            routed_active += per_expert * cfg.moe.top_k
            kinds["router"] += n_params(ffn.gate)
            kinds["shared experts"] += sum(n_params(m) for m in (ffn.shared, ffn.shared_gate) if m is not None)
        else:
            kinds["dense MLP"] += n_params(ffn)
    kinds["routed experts"] = routed
    head = 0 if cfg.tie_word_embeddings else n_params(model.head)
    kinds["lm head"] = head
    total = n_params(model)
    return ParamCounts(total, kinds["embedding"], head, routed, routed_active, {k: v for k, v in kinds.items() if v})


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (decimal, as parameter counts are quoted)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    """Binary units: 33554432 -> '32 MiB'."""
    for div, suffix in ((2**50, "PiB"), (2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g} {suffix}" if v < 100 else f"{v:.0f} {suffix}"
    return f"{n:.0f} B"


def training_length(cfg: ModelConfig) -> int:
    """The context the model was trained at: YaRN/llama3's original length, Qwen v1's seq_length, or
    max_position_embeddings."""
    r = cfg.rope
    return int(r.original_max_position_embeddings or r.seq_length or r.max_position_embeddings)

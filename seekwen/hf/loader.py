"""Load a Hugging Face checkpoint (config.json + safetensors) into a seekwen `Transformer`.

- a local folder, a folder inside a Hugging Face cache (`models--org--name`), or a hub id
  (resolved through huggingface_hub; the local cache first, so it works offline);
- single-file or sharded safetensors (`model.safetensors.index.json`), memory-mapped and copied
  tensor by tensor into preallocated parameters: no second full copy in RAM;
- fp8 e4m3 weights with 128x128-block `weight_scale_inv` (DeepSeek-V3/R1) are dequantized on load;
- safetensors only: seekwen never unpickles a checkpoint and never runs code from one.
Every error names the file and the tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ConfigError, ModelConfig
from ..model.rope import RotaryEmbedding
from ..model.transformer import Transformer
from .families import Family, family_for, name_map, parse_config
from .names import NameMap, Placement


class CheckpointError(RuntimeError):
    """A checkpoint seekwen cannot load; the message names the file and tensor."""


HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.tiktoken", "tokenizer*"]


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder for a path, an HF cache folder or a hub id."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        snaps = p / "snapshots"
        if snaps.is_dir():  # an HF cache entry: models--org--name
            ref = p / "refs" / "main"
            if ref.is_file() and (snaps / ref.read_text().strip() / "config.json").is_file():
                return snaps / ref.read_text().strip()
            cands = sorted((s for s in snaps.iterdir() if (s / "config.json").is_file()), key=os.path.getmtime)
            if cands:
                return cands[-1]
        raise CheckpointError(f"{p}: no config.json in this folder")
    if p.exists():
        raise CheckpointError(f"{p}: not a checkpoint folder")
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"{s}: no such checkpoint folder (and not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise CheckpointError(f"{s}: huggingface_hub is not installed") from e
    try:
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(f"{s}: not a local folder and not fetchable from the Hugging Face hub ({e})") from e


def read_config(folder: Path) -> tuple[dict, Family, ModelConfig]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    fam = family_for(raw, str(path))
    return raw, fam, parse_config(raw, str(path))


def merge_generation_eos(folder: Path, cfg: ModelConfig) -> None:
    """generate() stops where transformers would: at config.json's EOS and generation_config.json's."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    ids = cfg.eos_ids + [e for e in extra if e not in cfg.eos_ids]
    cfg.eos_token_id = ids or None


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: missing shard file(s): {', '.join(missing)}")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise CheckpointError(f"{folder}: only pickle weights (.bin/.pt) found; seekwen loads safetensors only")
    raise CheckpointError(f"{folder}: no *.safetensors weights found")


def dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek-V3 fp8 e4m3 weight [out, in] with per-block scales [ceil(out/128), ceil(in/128)]."""
    out_f, in_f = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return w.float() * s


class _Shards:
    """Open safetensors files, tensor name -> file, memory-mapped."""

    def __init__(self, files: list[Path]):
        self.handles = {}
        self.where: dict[str, Path] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: unreadable or corrupt safetensors file ({e})") from e
            self.handles[f] = h
            for name in h.keys():
                self.where[name] = f

    def get_slice(self, name: str):
        """A lazy view of tensor `name` (safetensors' slice: `.get_shape()`, `[rows, cols]` reads only those)."""
        f = self.where[name]
        try:
            return self.handles[f].get_slice(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: tensor '{name}' could not be read ({e})") from e

    def dtype(self, name: str) -> str:
        """The stored dtype of tensor `name` as safetensors spells it ("F32", "BF16", "F8_E4M3", ...)."""
        return self.get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            return self.handles[f].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: tensor '{name}' could not be read ({e})") from e


def _missing_label(names: NameMap, param: str, expert: int | None = None) -> str:
    """'model.layers.0.mlp.up_proj.weight (for layers.0.ffn.w3.weight)': the checkpoint name first."""
    label = param if expert is None else f"{param}[{expert}]"
    try:
        return f"{names.hf_name(param, expert)} (for {label})"
    except (ConfigError, ValueError):
        return label


def _more(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def checkpoint_placements(
    shards: _Shards, names: NameMap, params: dict[str, torch.Tensor], folder: Path, model_type: str
) -> Iterator[tuple[str, tuple[Placement, ...]]]:
    """(checkpoint tensor name, where it goes among `params`) for every tensor the model takes, in file
    order; rotary caches, fp8 scales and the like skipped. After the last one, a CheckpointError naming
    every tensor the model has no place for (so the error lists them all, not the first)."""
    unexpected = []
    for name in shards.where:
        if names.skip(name):
            continue
        placements = names.our_name(name)
        if placements is None or any(pl.param not in params for pl in placements):
            unexpected.append(name)
            continue
        yield name, placements
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected weight(s) for {model_type}: {_more(unexpected)}")


def load_state(model: Transformer, folder: Path) -> None:
    """Copy every checkpoint tensor into the model's parameters (named through the family's `NameMap`);
    error on anything missing, unexpected or of the wrong shape."""
    cfg = model.cfg
    names = name_map(cfg)
    shards = _Shards(weight_files(folder))
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[tuple[str, int | None]] = set()
    for name, placements in checkpoint_placements(shards, names, params, folder, cfg.model_type):
        t = _read(shards, name)
        for pl in placements:
            _copy_into(params[pl.param], pl, t, name, shards.where[name])
            filled.add((pl.param, pl.expert))
    missing = []
    for pname, p in params.items():
        if pname == "head.weight" and cfg.tie_word_embeddings:
            continue
        if names.stacked(pname):
            missing += [_missing_label(names, pname, e) for e in range(p.shape[0]) if (pname, e) not in filled]
        elif (pname, None) not in filled:
            missing.append(_missing_label(names, pname))
    if missing:
        raise CheckpointError(f"{folder}: missing weight(s): {_more(missing)}")


def _read(shards: _Shards, name: str) -> torch.Tensor:
    """One checkpoint tensor, fp8 e4m3 weights dequantized with their `_scale_inv`."""
    t = shards.get(name)
    if t.dtype == torch.float8_e4m3fn:
        scale_name = name + "_scale_inv"
        if scale_name not in shards.where:
            raise CheckpointError(f"{shards.where[name]}: fp8 tensor '{name}' has no '{scale_name}'")
        t = dequant_fp8(t, shards.get(scale_name))
    return t


def _copy_into(p: torch.Tensor, pl: Placement, t: torch.Tensor, name: str, file: Path) -> None:
    """Copy checkpoint tensor `name` (or its chunk `pl.part`) into parameter `p` (or its expert row)."""
    if pl.parts > 1 and t.shape[pl.dim] % pl.parts:
        raise CheckpointError(f"{file}: tensor '{name}' of shape {tuple(t.shape)} cannot be split")
    chunk = pl.take(t)
    if pl.expert is not None:
        if pl.expert >= p.shape[0]:
            raise CheckpointError(f"{file}: '{name}' names expert {pl.expert}, config has {p.shape[0]}")
        dest = p.data[pl.expert]
    else:
        dest = p.data
    if tuple(chunk.shape) != tuple(dest.shape):
        raise CheckpointError(
            f"{file}: tensor '{name}' has shape {tuple(chunk.shape)}, "
            f"expected {tuple(dest.shape)} (for {pl.param}) from config.json"
        )
    with torch.no_grad():
        dest.copy_(chunk)


def _has_mtp_weights(folder: Path, cfg: ModelConfig) -> bool:
    """Whether the checkpoint holds the first MTP layer's own tensors (`model.layers.{L}.eh_proj`)."""
    name = f"model.layers.{cfg.num_layers}.eh_proj.weight"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return name in json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return False
    return name in _Shards(weight_files(folder)).where


def build(cfg: ModelConfig, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """An uninitialised model (no memory touched until here, then one allocation per parameter)."""
    dtype = dtype or cfg.dtype
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype)
    for layer in model.blocks():  # the router bias stays fp32 (as in the reference)
        gate = getattr(layer.ffn, "gate", None)
        if getattr(gate, "bias", None) is not None:
            gate.bias.data = gate.bias.data.float()
    model.to_empty(device=device)
    model.rope = RotaryEmbedding(cfg.rope).to(device)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    return model


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype, a name ("float32", "bf16", ...) or None (the checkpoint's) -> a torch dtype or None."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}' (use float32, bfloat16 or float16)")
        return DTYPES[dtype]
    return dtype


def load(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config_overrides: dict | None = None,
    quantize: str | None = None,
    fast: bool = True,
    mtp: bool = True,
) -> Transformer:
    """Load a checkpoint: `seekwen.load("Qwen/Qwen2.5-0.5B-Instruct", dtype=torch.float32)`.

    dtype: torch dtype or "float32"/"bfloat16"/"float16"; default: the checkpoint's `torch_dtype`.
    config_overrides: config.json fields to change before building (e.g. a `rope_scaling`).
    fast: run the inference fast path (`seekwen.fast.prepare`: fused, re-laid-out layers and CPU kernels,
    tested equal to the reference), the default, as in the CLI; False keeps the plain reference modules
    (what training, hooks on the reference layers and the explanation tools want). quantize: "int8" or
    "int4" weight-only quantization of the linear layers and experts (implies fast). mtp: load DeepSeek-V3's
    multi-token-prediction layers (`model.mtp`, for speculative decoding) when the checkpoint has them;
    False skips reading them. The main model's logits are the same either way."""
    folder, cfg = checkpoint_config(path_or_id, config_overrides)
    dtype = parse_dtype(dtype)
    if cfg.num_mtp_layers and (not mtp or not _has_mtp_weights(folder, cfg)):
        cfg = cfg.replace(num_mtp_layers=0)  # (checkpoints re-packed without layer L are common)
    model = build(cfg, dtype, device)
    load_state(model, folder)
    return finish_loading(model, folder, fast, quantize)


def checkpoint_config(path_or_id: str | os.PathLike, config_overrides: dict | None = None) -> tuple[Path, ModelConfig]:
    """The checkpoint's folder and its parsed config, overrides applied, EOS ids from generation_config."""
    folder = resolve(path_or_id)
    raw, _, cfg = read_config(folder)
    if config_overrides:
        cfg = parse_config({**raw, **config_overrides}, str(folder / "config.json") + " (with overrides)")
    merge_generation_eos(folder, cfg)
    return folder, cfg


def finish_loading(model: Transformer, folder: Path, fast: bool, quantize: str | None) -> Transformer:
    """A model whose weights are in: inference mode, its folder and tokenizer, the fast path if asked for."""
    model.eval()
    model.path = folder
    from .tokenizer import Tokenizer

    model.tokenizer = Tokenizer.from_folder(folder)
    if fast or quantize:
        from ..fast import prepare

        prepare(model, quantize=quantize)
    return model

"""Sharded loading: each rank reads only its slice of each checkpoint tensor into its own parameters.

The model is built on the meta device with local shapes (`ParallelTransformer`), then materialised: one
allocation per local parameter, so no rank ever holds the whole model. Each checkpoint tensor is read
through `safe_open(...).get_slice` (memory-mapped; only the rank's rows or columns are copied out):

- the family's `NameMap` says how each parameter is split ("col": dim 0, "row": dim 1, "expert": by
  index), `param_ranges` turns that into this rank's [start, size) per dimension of the global parameter
  (GQA k/v: the KV heads of the rank's query heads; routed experts with ep = 1: w1/w3 rows, w2 columns);
- routed experts another rank owns are never read;
- fp8 block-scaled weights are dequantized per slice, with the scale blocks the slice covers;
- a row-parallel bias is read by tp-rank 0; the others hold zeros (the all-reduce adds it once).

Before anything is built, the ranks exchange a fingerprint of what they are about to load (config.json,
the weight index, the files' names and sizes, tp/ep/dtype/quantization): ranks that disagree, or one that
cannot read the checkpoint, make every rank fail with a message instead of hanging in a collective.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..hf.families import name_map
from ..hf.loader import (
    CheckpointError,
    _has_mtp_weights,
    _missing_label,
    _more,
    _Shards,
    checkpoint_config,
    checkpoint_placements,
    finish_loading,
    parse_dtype,
    weight_files,
)
from ..hf.names import NameMap, Placement
from ..model.rope import RotaryEmbedding
from ..model.transformer import Transformer
from .comm import Comm, ensure_group, env_rank, env_world_size, local_device
from .modules import ParallelMoE, ParallelTransformer
from .plan import ParallelError, ParallelPlan, check, kv_head_start, make_plan

# within one routed expert, which dimension its intermediate slice is on when ep = 1 (w1/w3 column-
# parallel, w2 row-parallel, as for a dense MLP)
EXPERT_INNER_DIM = {"w1": 0, "w3": 0, "w2": 1}


# ----------------------------------------------------------------------------------------------------
# which slice of each parameter this rank holds


def param_ranges(name: str, local_shape: tuple[int, ...], names: NameMap, cfg: ModelConfig,
                 plan: ParallelPlan) -> list[tuple[int, int]]:
    """This rank's [start, size) along each dimension of the global parameter `name`, whose local shape is
    `local_shape` (stacked experts: dim 0 is the expert index)."""
    ranges = [(0, n) for n in local_shape]
    if names.stacked(name):  # routed experts [E, ., .]
        ranges[0] = (plan.ep_rank * local_shape[0], local_shape[0])
        if plan.expert_tp > 1:
            dim = 1 + EXPERT_INNER_DIM[name.rpartition(".")[2]]
            ranges[dim] = (plan.tp_rank * local_shape[dim], local_shape[dim])
        return ranges
    dim = names.split_dim(name)
    if dim is None or plan.tp == 1:
        return ranges
    n = local_shape[dim]
    start = plan.tp_rank * n
    if cfg.mla is None and name.rsplit(".", 2)[-2] in ("wk", "wv"):  # the KV heads of this rank's q heads
        start = kv_head_start(cfg, plan) * cfg.head_dim
    ranges[dim] = (start, n)
    return ranges


def is_row_bias(name: str, names: NameMap) -> bool:
    """A row-parallel layer's bias (added once, after the all-reduce)."""
    return name.endswith(".bias") and names.split_dim(name[: -len("bias")] + "weight") == 1


def ckpt_slices(pl: Placement, ranges: list[tuple[int, int]], ckpt_shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The slice of the checkpoint tensor holding this rank's piece of placement `pl`. A per-expert tensor
    is one row of the stacked parameter (its dims are the parameter's without dim 0); a fused tensor
    (Qwen v1's c_attn, transformers 5's gate_up_proj) holds `parts` chunks along `pl.dim`."""
    rs = ranges[1:] if pl.expert is not None else ranges
    out = []
    for d, (start, size) in enumerate(rs):
        if pl.parts > 1 and d == pl.dim:
            start += pl.part * (ckpt_shape[d] // pl.parts)
        out.append(slice(start, start + size))
    return tuple(out)


def read_fp8_slice(shards: _Shards, name: str, sl: tuple[slice, ...], block: int = 128) -> torch.Tensor:
    """A slice [rows, cols] of a DeepSeek fp8 e4m3 weight, dequantized with the scale blocks it covers."""
    scale_name = name + "_scale_inv"
    if scale_name not in shards.where:
        raise CheckpointError(f"{shards.where[name]}: fp8 tensor '{name}' has no '{scale_name}'")
    w = shards.get_slice(name)[sl].float()
    (r0, r1), (c0, c1) = ((s.start, s.stop) for s in sl)
    scale = shards.get_slice(scale_name)[r0 // block : (r1 - 1) // block + 1, c0 // block : (c1 - 1) // block + 1]
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    s = s[r0 - (r0 // block) * block :][: r1 - r0, c0 - (c0 // block) * block :][:, : c1 - c0]
    return w * s


# ----------------------------------------------------------------------------------------------------
# the load


def load_state_sharded(model: ParallelTransformer, folder: Path) -> None:
    """Fill this rank's parameters from the checkpoint, reading only their slices; error on anything
    missing, unexpected or of the wrong shape (as the one-process loader)."""
    cfg, plan = model.full_cfg, model.parallel
    names = name_map(cfg)
    with torch.device("meta"):
        global_shapes = {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters(remove_duplicate=False)}
    shards = _Shards(weight_files(folder))
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[tuple[str, int | None]] = set()
    for name, placements in checkpoint_placements(shards, names, params, folder, cfg.model_type):
        for pl in placements:
            if not _load_one(shards, name, pl, params[pl.param], global_shapes[pl.param], names, cfg, plan):
                continue
            if pl.expert is not None:
                filled.add((pl.param, pl.expert - _expert_start(model, pl.param)))
            elif names.stacked(pl.param):  # transformers 5's fused 3D experts: every local expert at once
                filled.update((pl.param, e) for e in range(params[pl.param].shape[0]))
            else:
                filled.add((pl.param, None))
    _check_filled(model, params, filled, names, folder)


def _expert_start(model: ParallelTransformer, param: str) -> int:
    """The first expert index the module holding stacked parameter `param` owns."""
    ffn = model.get_submodule(param.rsplit(".", 2)[0])  # "layers.1.ffn.experts.w1" -> "layers.1.ffn"
    return ffn.expert_start if isinstance(ffn, ParallelMoE) else 0


def _load_one(shards: _Shards, name: str, pl: Placement, p: torch.Tensor, global_shape: tuple[int, ...],
              names: NameMap, cfg: ModelConfig, plan: ParallelPlan) -> bool:
    """Copy this rank's piece of checkpoint tensor `name` (placement `pl`) into `p`; False when the
    piece belongs to another rank (a routed expert owned elsewhere: never read)."""
    file = shards.where[name]
    ckpt_shape = tuple(shards.get_slice(name).get_shape())
    expect = global_shape[1:] if pl.expert is not None else global_shape
    piece = list(ckpt_shape)
    if pl.parts > 1:
        if ckpt_shape[pl.dim] % pl.parts:
            raise CheckpointError(f"{file}: tensor '{name}' of shape {ckpt_shape} cannot be split")
        piece[pl.dim] //= pl.parts
    if pl.expert is not None and pl.expert >= global_shape[0]:
        raise CheckpointError(f"{file}: '{name}' names expert {pl.expert}, config has {global_shape[0]}")
    if tuple(piece) != tuple(expect):
        raise CheckpointError(f"{file}: tensor '{name}' has shape {tuple(piece)}, expected {tuple(expect)} "
                              f"(for {pl.param}) from config.json")
    ranges = param_ranges(pl.param, tuple(p.shape), names, cfg, plan)
    dest = p.data
    if pl.expert is not None:
        start, size = ranges[0]
        if not start <= pl.expert < start + size:
            return False
        dest = p.data[pl.expert - start]
    with torch.no_grad():
        if is_row_bias(pl.param, names) and plan.tp_rank != 0:
            dest.zero_()
            return True
        sl = ckpt_slices(pl, ranges, ckpt_shape)
        try:
            if shards.dtype(name) == "F8_E4M3":
                t = read_fp8_slice(shards, name, sl)
            else:
                t = shards.get_slice(name)[sl]
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"{file}: tensor '{name}' could not be read ({e})") from e
        dest.copy_(t)
    return True


def _check_filled(model, params: dict, filled: set, names: NameMap, folder: Path) -> None:
    missing = []
    for pname, p in params.items():
        if pname == "head.weight" and model.cfg.tie_word_embeddings:
            continue
        if names.stacked(pname):
            start = _expert_start(model, pname)
            missing += [_missing_label(names, pname, start + e) for e in range(p.shape[0]) if (pname, e) not in filled]
        elif (pname, None) not in filled:
            missing.append(_missing_label(names, pname))
    if missing:
        raise CheckpointError(f"{folder}: missing weight(s): {_more(missing)}")


def build_local(cfg: ModelConfig, plan: ParallelPlan, comm: Comm, dtype: torch.dtype,
                device: torch.device) -> ParallelTransformer:
    """This rank's uninitialised shard: built on the meta device, then one allocation per local parameter."""
    with torch.device("meta"):
        model = ParallelTransformer(cfg, plan, comm)
    model.to(dtype)
    for layer in model.blocks():  # the router bias stays fp32 (as in the reference)
        gate = getattr(layer.ffn, "gate", None)
        if getattr(gate, "bias", None) is not None:
            gate.bias.data = gate.bias.data.float()
    model.to_empty(device=device)
    model.rope = RotaryEmbedding(model.cfg.rope).to(device)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    return model


def fingerprint(folder: Path, extra: dict) -> str:
    """A hash of what a rank is about to load: config.json, the weight index, each weight file's name and
    size, and the load's settings. Equal on every rank, or the ranks disagree on the checkpoint."""
    h = hashlib.sha256()
    for f in ("config.json", "model.safetensors.index.json"):
        if (folder / f).is_file():
            h.update((folder / f).read_bytes())
    for f in weight_files(folder):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _prepare_rank(path_or_id, config_overrides, tp, ep, world, rank, settings) -> tuple:
    """(folder, config, plan, fingerprint) for this rank; raises what a one-process load would."""
    folder, cfg = checkpoint_config(path_or_id, config_overrides)
    if cfg.num_mtp_layers and (not settings["mtp"] or not _has_mtp_weights(folder, cfg)):
        cfg = cfg.replace(num_mtp_layers=0)  # as the one-process loader: the main model only
    plan = make_plan(world, rank, tp, ep)
    check(cfg, plan)
    return folder, cfg, plan, fingerprint(folder, {**settings, "tp": plan.tp, "ep": plan.ep,
                                                   "overrides": config_overrides})


def agree(comm: Comm, mine: tuple[str | None, str | None]) -> None:
    """Exchange (fingerprint, error) with every rank; raise on every rank if any failed or they differ."""
    views = comm.all_gather_object(mine)
    errors = [(r, err) for r, (_, err) in enumerate(views) if err is not None]
    if errors:
        if len({err for _, err in errors}) == 1 and len(errors) == comm.world:
            raise ParallelError(errors[0][1])
        raise ParallelError("; ".join(f"rank {r}: {err}" for r, err in errors))
    prints = [fp for fp, _ in views]
    if len(set(prints)) > 1:
        who = ", ".join(f"rank {r}: {fp}" for r, fp in enumerate(prints))
        raise ParallelError(f"ranks disagree on the checkpoint or the load settings (config/index hashes {who}): "
                            f"give every rank the same files and flags")


def load_parallel(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config_overrides: dict | None = None,
    quantize: str | None = None,
    fast: bool = True,
    tp: int | None = None,
    ep: int | None = None,
    mtp: bool = True,
) -> ParallelTransformer:
    """`seekwen.load` on every rank of a torchrun job: this rank's shard (see the module docstring), with
    DeepSeek-V3's MTP layers (sharded as the main layers) when `mtp` and the checkpoint has them."""
    dev = local_device(device)
    ensure_group(dev)
    comm = Comm()
    dtype = parse_dtype(dtype)
    settings = {"dtype": str(dtype), "quantize": quantize, "fast": bool(fast or quantize), "mtp": bool(mtp)}
    try:
        folder, cfg, plan, fp = _prepare_rank(path_or_id, config_overrides, tp, ep, comm.world, comm.rank, settings)
        mine = (fp, None)
    except (ConfigError, CheckpointError, ParallelError, OSError, ValueError) as e:
        mine = (None, str(e))
    agree(comm, mine)
    model = build_local(cfg, plan, comm, dtype or cfg.dtype, dev)
    load_state_sharded(model, folder)
    return finish_loading(model, folder, fast, quantize)


def world_size() -> int:
    return env_world_size()


def rank() -> int:
    return env_rank()

"""`seekwen trace MODEL`: the module hierarchy a forward pass goes through, with shapes and parameter
counts, from config.json alone.

The model is built on PyTorch's meta device (shapes, no storage) and run on a meta batch [B, S]
with forward hooks on every module. Two places would need real numbers and are swapped out on the
traced instance only: the rotary table (which looks at the largest position) and the routed
experts' dispatch (which counts tokens per expert); their output shapes are known without it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from ..hf.families import name_map
from ..hf.names import NameMap
from .see import (
    Source,
    architecture,
    count_params,
    emit,
    human,
    meta_model,
    n_params,
    one_line_errors,
    read_model_config,
)


@dataclass
class Row:
    name: str  # ours, e.g. "layers.3-60.attn.wq_a"
    hf: str
    what: str
    inputs: str
    outputs: str
    params: int
    depth: int
    count: int = 1  # identical layers collapsed into this row

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Trace:
    model: str
    architecture: str
    batch: int
    seq_len: int
    rows: list[Row]
    total: int
    active: int
    active_with_embedding: int
    by_kind: dict[str, int]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# running on meta


class _MetaRope(nn.Module):
    """Stands in for RotaryEmbedding on meta: same output shapes, no position lookup."""

    def __init__(self, dim: int):
        super().__init__()
        self.half = dim // 2

    def forward(self, positions: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.empty(*positions.shape, self.half, device=positions.device)
        return z, z


def _meta_experts(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.zeros_like(x)  # the routed experts return one [N, dim] sum per token


def _shapes(obj) -> list[list[int]]:
    if isinstance(obj, torch.Tensor):
        return [list(obj.shape)]
    if isinstance(obj, tuple | list):
        return [s for o in obj for s in _shapes(o)]
    return []


def _fmt(shapes: list[list[int]]) -> str:
    return " ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)


def record_shapes(cfg: ModelConfig, batch: int, seq_len: int) -> tuple[nn.Module, dict[str, tuple[str, str]]]:
    """Run a meta forward; module name -> (input shapes, output shapes)."""
    if cfg.rope.type == "qwen_dynamic":  # its alpha is read from real lengths; shapes are the same
        cfg = cfg.replace(rope=type(cfg.rope)(**{**asdict(cfg.rope), "type": "default"}))
    model = meta_model(cfg)
    model.rope = _MetaRope(cfg.rope.dim)
    for layer in model.layers:
        if hasattr(layer.ffn, "experts"):
            layer.ffn.experts.forward = _meta_experts
    seen: dict[str, tuple[str, str]] = {}
    hooks = []
    for name, mod in model.named_modules():
        def hook(m, args, out, name=name):
            seen.setdefault(name, (_fmt(_shapes(args)), _fmt(_shapes(out))))
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.empty(batch, seq_len, dtype=torch.long, device="meta"))
    for h in hooks:
        h.remove()
    return model, seen


# ----------------------------------------------------------------------------------------------------
# describing modules


def describe(mod: nn.Module, cfg: ModelConfig) -> str:
    kind = type(mod).__name__
    if kind == "Linear":
        return f"Linear {mod.in_features}→{mod.out_features}" + (" +bias" if mod.bias is not None else "")
    if kind == "Embedding":
        return f"Embedding {mod.num_embeddings}×{mod.embedding_dim}"
    if kind == "RMSNorm":
        return f"RMSNorm {mod.weight.shape[0]}"
    if kind == "MLP":
        return f"SwiGLU MLP {mod.w1.in_features}→{mod.w1.out_features}→{mod.w1.in_features}"
    if kind == "MLA":
        m = cfg.mla
        return (f"MLA: {cfg.num_heads} heads, latent KV {m.kv_lora_rank}+{m.qk_rope_head_dim} rope, "
                f"q {'direct' if m.q_lora_rank is None else f'rank {m.q_lora_rank}'}")
    if kind == "Attention":
        h, kv = cfg.num_heads, cfg.num_kv_heads
        what = f"MHA {h} heads" if h == kv else f"GQA {h} q / {kv} kv heads"
        return what + f" × {cfg.head_dim}" + (f", window {mod.window}" if mod.window else "")
    if kind == "MoE":
        m = cfg.moe
        shared = f" + shared {m.shared_intermediate_size}" if m.shared_intermediate_size else ""
        return f"MoE: {m.n_routed_experts} routed, top-{m.top_k}{shared}"
    if kind == "Gate":
        m = cfg.moe
        return f"router: {m.scoring} → {m.topk_method} top-{m.top_k}"
    if kind == "Experts":
        e, inter, d = mod.w1.shape
        return f"{e} × SwiGLU {d}→{inter}→{d}"
    if kind == "Block":
        return "decoder layer (MoE)" if hasattr(mod.ffn, "experts") else "decoder layer (dense)"
    if kind == "Transformer":
        return f"causal LM, {cfg.num_layers} layers"
    return kind


def _children(mod: nn.Module, prefix: str, depth: int, max_depth: int):
    for name, child in mod.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child, depth
        if depth < max_depth:
            yield from _children(child, full, depth + 1, max_depth)


def _layer_rows(i: int, layer: nn.Module, cfg: ModelConfig, names: NameMap, seen: dict, max_depth: int) -> list[Row]:
    base = f"layers.{i}"
    rows = [Row(base, names.hf_module(base), describe(layer, cfg), *seen.get(base, ("", "")), n_params(layer), 1)]
    for name, mod, depth in _children(layer, base, 2, max_depth):
        if isinstance(mod, nn.ModuleList):
            continue
        rows.append(Row(name, names.hf_module(name), describe(mod, cfg), *seen.get(name, ("", "")), n_params(mod),
                        depth))
    return rows


def _span_hf_name(names: NameMap, first: int, span: str, suffix: str) -> str:
    """The HF name of a module in a group of layers: layer `first`'s, with the layer index written as `span`."""
    hf, layer = names.hf_module(f"layers.{first}{suffix}"), names.hf_module(f"layers.{first}")
    if not hf.startswith(layer):
        return hf
    return f"{names.hf_module('layers')}.{span}{hf[len(layer):]}"


def _signature(rows: list[Row]) -> tuple:
    return tuple((r.name.split(".", 2)[-1], r.what, r.inputs, r.outputs, r.params) for r in rows)


def collapse_layers(model: nn.Module, cfg: ModelConfig, seen: dict, max_depth: int) -> list[Row]:
    """Consecutive identical layers become one group, named 'layers.3–60 ×58'."""
    names = name_map(cfg)
    groups: list[tuple[int, int, list[Row]]] = []
    for i, layer in enumerate(model.layers):
        rows = _layer_rows(i, layer, cfg, names, seen, max_depth)
        if groups and _signature(groups[-1][2][1:]) == _signature(rows[1:]) and groups[-1][2][0].what == rows[0].what:
            first, _, grows = groups[-1]
            groups[-1] = (first, i, grows)
        else:
            groups.append((i, i, rows))
    out = []
    for first, last, rows in groups:
        span = f"{first}" if first == last else f"{first}–{last}"
        count = last - first + 1
        for r in rows:
            suffix = r.name[len(f"layers.{first}"):]
            r.name = f"layers.{span}{suffix}"
            r.hf = _span_hf_name(names, first, span, suffix)
            r.count = count
            out.append(r)
    return out


def build_trace(src: Source, batch: int, seq_len: int, max_depth: int = 4) -> Trace:
    cfg = src.cfg
    model, seen = record_shapes(cfg, batch, seq_len)
    names = name_map(cfg)
    arch = architecture(src)
    rows = [Row("", arch, describe(model, cfg), *seen.get("", ("", "")), n_params(model), 0)]
    rows.append(Row("embed", names.hf_module("embed"), describe(model.embed, cfg), *seen["embed"],
                    n_params(model.embed), 1))
    rows.append(Row("layers", names.hf_module("layers"), f"{cfg.num_layers} × decoder layer", "", "",
                    n_params(model.layers), 1))
    rows += collapse_layers(model, cfg, seen, max_depth)
    rows.append(Row("norm", names.hf_module("norm"), describe(model.norm, cfg), *seen["norm"], n_params(model.norm), 1))
    tied = " (tied to embed)" if cfg.tie_word_embeddings else ""
    rows.append(Row("head", names.hf_module("head"), describe(model.head, cfg) + tied, *seen["head"],
                    0 if tied else n_params(model.head), 1))
    counts = count_params(model)
    return Trace(src.where, arch, batch, seq_len, rows, counts.total, counts.active, counts.active_with_embedding,
                 counts.by_kind, notes(cfg, batch, seq_len))


def notes(cfg: ModelConfig, B: int, S: int) -> list[str]:
    """What happens inside attention and the MoE that module hooks cannot see."""
    H = cfg.num_heads
    out = [f"attention scores inside each layer: [{B}, {H}, {S}, {S}] (B, heads, queries, keys); "
           "SDPA computes them in tiles where a fused kernel exists"]
    if cfg.mla is not None:
        m = cfg.mla
        k_dims = f"{m.qk_nope_head_dim}+{m.qk_rope_head_dim}"
        out.append(f"MLA caches per token and layer only c_kv [{m.kv_lora_rank}] + k_pe [{m.qk_rope_head_dim}]; "
                   f"decompressed per head: k [{H}, {k_dims}], v [{H}, {m.v_head_dim}]")
    else:
        out.append(f"KV cache per token and layer: k, v [{cfg.num_kv_heads}, {cfg.head_dim}]"
                   + (f" (each kv head serves {H // cfg.num_kv_heads} query heads)" if H != cfg.num_kv_heads else ""))
    if cfg.moe is not None:
        m = cfg.moe
        per = B * S * m.top_k / m.n_routed_experts
        out.append(f"routed experts: {B * S} tokens × top-{m.top_k} = {B * S * m.top_k} (token, expert) pairs, "
                   f"≈{per:.3g} tokens per expert if balanced; each expert runs only on its own tokens")
    out.append(f"rotary: {cfg.rope.dim} of each head's dims rotated in {cfg.rope.dim // 2} pairs "
               f"({'interleaved' if cfg.rope.interleaved else 'rotate-half'}), theta {cfg.rope.theta:g}, "
               f"scaling '{cfg.rope.type}'")
    return out


# ----------------------------------------------------------------------------------------------------
# output


def print_trace(t: Trace) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{t.architecture} forward pass, batch {t.batch} × seq {t.seq_len}  ({t.model})",
                  show_lines=False, header_style="bold")
    for col, kw in (("module (seekwen)", {}), ("Hugging Face name", {"style": "cyan"}), ("what", {}),
                    ("input", {"style": "green"}), ("output", {"style": "green"}),
                    ("params", {"justify": "right"})):
        table.add_column(col, **kw)
    for r in t.rows:
        indent = "  " * r.depth
        name = r.name or "(model)"
        if r.count > 1 and r.name.count(".") == 1:
            name += f" ×{r.count}"
        params = human(r.params) + (f" ×{r.count}" if r.count > 1 and r.params else "")
        cells = (indent + name, r.hf, r.what, r.inputs, r.outputs, params if r.params else "")
        table.add_row(*(escape(c) for c in cells))
    console = Console()
    console.print(table)
    summary = Table(title="parameters", header_style="bold")
    summary.add_column("part")
    summary.add_column("count", justify="right")
    summary.add_column("exact", justify="right")
    for k, v in t.by_kind.items():
        summary.add_row(k, human(v), f"{v:,}")
    summary.add_row("[bold]total[/]", human(t.total), f"{t.total:,}")
    summary.add_row("[bold]active per token[/] (no input embedding)", human(t.active), f"{t.active:,}")
    summary.add_row("active per token, with input embedding", human(t.active_with_embedding),
                    f"{t.active_with_embedding:,}")
    console.print(summary)
    for n in t.notes:
        console.print(f"• {escape(n)}")


@one_line_errors
def run(args: argparse.Namespace) -> int:
    if args.seq_len < 1 or args.batch < 1:
        raise UserError("--seq-len and --batch must be positive")
    t = build_trace(read_model_config(args.model), args.batch, args.seq_len, args.depth)
    return emit(args, asdict(t), lambda: print_trace(t))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace",
        help="module hierarchy of the forward pass, with shapes and parameter counts (config.json is enough)",
        description="Build the model on the meta device (no weights, no memory) and run one forward pass of "
        "a [batch, seq-len] batch with hooks on every module: for each module its seekwen and Hugging Face "
        "names, input and output shapes and parameter count; identical consecutive layers are collapsed "
        "(e.g. 'layers.3–60 ×58'). Ends with total and active-per-token parameters. MODEL may be a "
        "checkpoint folder, a Hugging Face cache folder, a hub id or a bare config.json file.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, HF cache folder, hub id or config.json (default: the bundled model)")
    p.add_argument("--seq-len", "-s", type=int, default=16, help="sequence length S of the traced batch (default 16)")
    p.add_argument("--batch", "-b", type=int, default=2, help="batch size B (default 2)")
    p.add_argument("--depth", type=int, default=4, help="how deep to show submodules (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)

"""`seekwen routes MODEL --text FILE`: where a mixture-of-experts model sends each token.

Runs the text through the model in windows of the training length with every router's `record` flag
on (`Gate.last_indices`: the top-k expert ids chosen for each token), then reports per MoE layer:
the load of each expert (token assignments), its entropy (log2 E bits = perfectly even), max/mean
load and the coefficient of variation (std/mean; 0 = perfectly even), unused experts, and the tokens
each expert sees most often.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from .see import emit, one_line_errors, training_length


@dataclass
class LayerRoutes:
    layer: int
    tokens: int
    load: list[int]  # (token, expert) assignments per expert
    top_tokens: list[list[tuple[str, int, float]]] = field(default_factory=list)  # per expert

    @property
    def n_experts(self) -> int:
        return len(self.load)

    @property
    def entropy_bits(self) -> float:
        total = sum(self.load)
        return -sum(c / total * math.log2(c / total) for c in self.load if c)

    @property
    def max_over_mean(self) -> float:
        return max(self.load) / (sum(self.load) / self.n_experts)

    @property
    def cv(self) -> float:
        t = torch.tensor(self.load, dtype=torch.float64)
        return float(t.std(unbiased=False) / t.mean())

    @property
    def unused(self) -> int:
        return sum(1 for c in self.load if c == 0)

    def summary(self) -> dict:
        return {"layer": self.layer, "tokens": self.tokens, "load": self.load, "entropy_bits": self.entropy_bits,
                "max_entropy_bits": math.log2(self.n_experts), "max_over_mean": self.max_over_mean, "cv": self.cv,
                "unused": self.unused, "top_tokens": self.top_tokens}


def moe_gates(model) -> dict[int, torch.nn.Module]:
    return {i: layer.ffn.gate for i, layer in enumerate(model.layers) if hasattr(layer.ffn, "gate")}


@torch.inference_mode()
def collect(model, ids: torch.Tensor, window: int, batch: int = 8) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Expert ids [N, k] per MoE layer for the N tokens of `ids` cut into windows, and those N tokens."""
    gates = moe_gates(model)
    n = (len(ids) // window) * window
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    chunks = ids[:n].view(-1, window)
    picked: dict[int, list[torch.Tensor]] = {i: [] for i in gates}
    for g in gates.values():
        g.record = True
    try:
        for b in range(0, len(chunks), batch):
            model(chunks[b:b + batch].to(model.device))
            for i, g in gates.items():
                picked[i].append(g.last_indices.cpu())
    finally:
        for g in gates.values():
            g.record, g.last_indices = False, None
    return {i: torch.cat(v) for i, v in picked.items()}, chunks.reshape(-1)


def analyse(indices: dict[int, torch.Tensor], tokens: torch.Tensor, n_experts: int, decode, top: int = 5) -> list:
    out = []
    for layer, idx in indices.items():
        k = idx.shape[1]
        load = torch.bincount(idx.reshape(-1), minlength=n_experts).tolist()
        flat_tok = tokens[:, None].expand(-1, k).reshape(-1).tolist()
        pairs = Counter(zip(idx.reshape(-1).tolist(), flat_tok, strict=True))
        freq = Counter(tokens.tolist())
        per_expert: list[list[tuple[str, int, float]]] = [[] for _ in range(n_experts)]
        for (e, t), c in pairs.most_common():
            if len(per_expert[e]) < top:
                per_expert[e].append((decode(t), c, c / freq[t]))
        out.append(LayerRoutes(layer, len(tokens), load, per_expert))
    return out


def print_routes(model_name: str, layers: list[LayerRoutes], k: int, show_layers: list[int]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    E = layers[0].n_experts
    console.print(f"[bold]{model_name}[/]: {layers[0].tokens:,} tokens, {E} routed experts, top-{k}; "
                  f"even load = {layers[0].tokens * k / E:,.0f} assignments per expert, "
                  f"entropy {math.log2(E):.2f} bits")
    t = Table(title="expert load per MoE layer", header_style="bold")
    for col in ("layer", "load per expert (assignments)", "min", "max/mean", "CV", "entropy (bits)", "unused"):
        t.add_column(col, justify="right")
    for r in layers:
        t.add_row(str(r.layer), " ".join(str(c) for c in r.load), str(min(r.load)), f"{r.max_over_mean:.2f}",
                  f"{r.cv:.3f}", f"{r.entropy_bits:.3f} / {math.log2(E):.2f}",
                  f"[red]{r.unused}[/]" if r.unused else "0")
    console.print(t)
    for r in layers:
        if r.layer not in show_layers:
            continue
        tt = Table(title=f"layer {r.layer}: most frequent tokens per expert (count, share of that token's "
                   "occurrences)", header_style="bold")
        tt.add_column("expert", justify="right")
        tt.add_column("load", justify="right")
        tt.add_column("top tokens")
        for e, toks in enumerate(r.top_tokens):
            tt.add_row(str(e), str(r.load[e]), escape("  ".join(f"{s!r} {c} ({share:.0%})" for s, c, share in toks)))
        console.print(tt)


def heatmap(layers: list[LayerRoutes], k: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E = layers[0].n_experts
    frac = torch.tensor([[c / sum(r.load) for c in r.load] for r in layers])
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * E + 2), max(2.5, 0.5 * len(layers) + 1.5)))
    im = ax.imshow(frac * E, cmap="viridis", aspect="auto")
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)), [str(r.layer) for r in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if E <= 32:
        for i in range(len(layers)):
            for j in range(E):
                ax.text(j, i, f"{frac[i, j] * E:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label="load / even load")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@one_line_errors
def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .common import load_model
    from .context import read_tokens

    model = load_model(args.model, args.dtype, args.device, fast=False)
    cfg = model.cfg
    if not cfg.is_moe:
        raise ValueError(f"{model.path}: not a mixture-of-experts model ({cfg.model_type}, no routed experts)")
    if args.tokens < 1:
        raise ValueError("--tokens must be positive")
    ids = read_tokens(Path(model.path), args.text, args.tokens)
    window = args.window or training_length(cfg)
    indices, tokens = collect(model, ids, window)
    tok = model.tokenizer
    layers = analyse(indices, tokens, cfg.moe.n_routed_experts, lambda t: tok.decode([t], skip_special_tokens=False),
                     args.top)
    show = [int(x) for x in args.layers.split(",")] if args.layers else list(indices)[-3:]
    data = {"model": str(model.path), "window": window, "top_k": cfg.moe.top_k,
            "layers": [r.summary() for r in layers]}
    title = f"{Path(model.path).name}: expert load ({len(tokens):,} tokens)"
    return emit(args, data, lambda: print_routes(str(model.path), layers, cfg.moe.top_k, show),
                lambda path: heatmap(layers, cfg.moe.top_k, path, title))


def register(sub: argparse._SubParsersAction) -> None:
    from .common import add_runtime_args

    p = sub.add_parser(
        "routes",
        help="MoE routing: expert load per layer, balance figures, top tokens per expert, heatmap",
        description="Run a text through a mixture-of-experts model with the routers recording their choices. "
        "Per MoE layer: assignments per expert, entropy of the load, max/mean load, coefficient of variation, "
        "unused experts; the most frequent tokens of each expert; --plot draws a layer × expert heatmap.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, HF cache folder or hub id (default: the bundled model)")
    p.add_argument("--text", required=True, help="UTF-8 text file to route")
    p.add_argument("--tokens", type=int, default=32768, help="use at most this many tokens of the text")
    p.add_argument("--window", type=int, default=None, help="tokens per forward window (default: training length)")
    p.add_argument("--top", type=int, default=5, help="top tokens shown per expert (default 5)")
    p.add_argument("--layers", default=None, help="comma-separated MoE layers whose top tokens to show "
                   "(default: the last three)")
    p.add_argument("--plot", metavar="PNG", default=None, help="write a layer × expert load heatmap")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_runtime_args(p)
    p.set_defaults(func=run)

"""`seekwen rope MODEL`: what RoPE rotates, pair by pair, and what each context-extension rule does to it.

Pair i of a head's rotary dims turns by `position * inv_freq[i]` radians, inv_freq[i] = theta^(-2i/d).
Pair 0 is the *fast* end (inv_freq 1: one turn per 2π ≈ 6.3 tokens); the last pair is the *slow* end
(one turn per tens of thousands of tokens, often more than the training context). Every number here
comes from the engine's own `seekwen.model.rope.compute_inv_freq` with config overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from ..config import RopeConfig
from ..model.rope import compute_inv_freq, qwen_ntk_alpha
from .see import emit, one_line_errors, read_model_config, training_length

METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "qwen")
METHOD_HELP = {
    "none": "as trained",
    "linear": "position interpolation: every frequency / factor",
    "ntk": "NTK-aware static: theta × factor^(d/(d-2)); fast pairs kept, slow pairs stretched ≈ factor",
    "dynamic": "HF dynamic NTK at length L: theta × (factor·L/T − (factor−1))^(d/(d−2))",
    "yarn": "YaRN: fast pairs (> beta_fast turns in T) kept, slow (< beta_slow) / factor, ramp between",
    "qwen": "Qwen v1 dynamic NTK at L: alpha = max(2^ceil(log2(L/T)+1) − 1, 1); theta × alpha^(d/(d−2))",
}


def base_rope(rope: RopeConfig, train_len: int) -> RopeConfig:
    """The model's rotary settings with no scaling, at its training length."""
    return dataclasses.replace(rope, type="default", factor=1.0, max_position_embeddings=train_len,
                               original_max_position_embeddings=None, mscale=None, mscale_all_dim=None,
                               attention_factor=None)


def method_inv_freq(method: str, base: RopeConfig, factor: float, length: int) -> tuple[torch.Tensor, float]:
    """inv_freq and attention factor for `method` extending `base` by `factor`, evaluated at `length`."""
    d, T = base.dim, base.max_position_embeddings
    if method == "none":
        return compute_inv_freq(base)
    if method == "linear":
        return compute_inv_freq(dataclasses.replace(base, type="linear", factor=factor))
    if method == "ntk":
        return compute_inv_freq(dataclasses.replace(base, theta=base.theta * factor ** (d / (d - 2))))
    if method == "dynamic":
        return compute_inv_freq(dataclasses.replace(base, type="dynamic", factor=factor), seq_len=length)
    if method == "yarn":
        return compute_inv_freq(dataclasses.replace(base, type="yarn", factor=factor,
                                                    original_max_position_embeddings=T))
    if method == "qwen":
        alpha = qwen_ntk_alpha(length, T)
        return compute_inv_freq(dataclasses.replace(base, theta=base.theta * alpha ** (d / (d - 2))))
    raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def band(turns: float, beta_fast: float, beta_slow: float) -> str:
    """YaRN's three bands, by turns made within the training context."""
    if turns >= beta_fast:
        return "fast"
    if turns < beta_slow:
        return "slow"
    return "mid"


def pair_dims(i: int, d: int, interleaved: bool) -> str:
    return f"{2 * i},{2 * i + 1}" if interleaved else f"{i},{i + d // 2}"


def build(args: argparse.Namespace) -> dict:
    src = read_model_config(args.model)
    cfg = src.cfg
    T = args.train_len or training_length(cfg)
    factor = args.factor
    length = args.length or int(round(factor * T))
    base = base_rope(cfg.rope, T)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method '{m}' (choose from {', '.join(METHODS)})")
    results = {m: method_inv_freq(m, base, factor, length) for m in methods}
    if cfg.rope.type != "default":
        results["model"] = compute_inv_freq(cfg.rope, seq_len=length)
    inv0 = compute_inv_freq(base)[0]
    rows = []
    for i, f in enumerate(inv0.tolist()):
        wl = 2 * math.pi / f
        turns = T / wl
        rows.append({
            "pair": i, "dims": pair_dims(i, base.dim, base.interleaved), "inv_freq": f, "wavelength": wl,
            "turns_in_training": turns, "band": band(turns, cfg.rope.beta_fast, cfg.rope.beta_slow),
            "wavelength_by_method": {m: 2 * math.pi / float(inv[i]) for m, (inv, _) in results.items()},
        })
    return {"model": src.where, "rope_dim": base.dim, "theta": base.theta, "interleaved": base.interleaved,
            "configured": cfg.rope.type, "training_length": T, "factor": factor, "length": length,
            "attention_factor": {m: a for m, (_, a) in results.items()}, "pairs": rows}


def print_lab(lab: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    T, L = lab["training_length"], lab["length"]
    console.print(f"[bold]{lab['model']}[/]  rotary dims {lab['rope_dim']} ({lab['rope_dim'] // 2} pairs, "
                  f"{'interleaved' if lab['interleaved'] else 'rotate-half'}), theta {lab['theta']:g}, "
                  f"training context T={T}, configured scaling '{lab['configured']}'")
    console.print(f"methods extend by factor {lab['factor']:g} (target L={L}); cells: wavelength in tokens "
                  "(2π / inv_freq). fast = ≥ beta_fast turns within T (high frequency, short wavelength, low "
                  "pair index); slow = < beta_slow turns (wavelength longer than T).")
    methods = list(lab["pairs"][0]["wavelength_by_method"])
    t = Table(header_style="bold")
    for col in ("pair", "dims", "inv_freq", "wavelength", f"turns in {T}", "band"):
        t.add_column(col, justify="right")
    for m in methods:
        t.add_column(m, justify="right")
    colour = {"fast": "red", "mid": "yellow", "slow": "blue"}
    for r in lab["pairs"]:
        cells = [f"{r['wavelength_by_method'][m]:,.4g}" for m in methods]
        t.add_row(str(r["pair"]), r["dims"], f"{r['inv_freq']:.4g}", f"{r['wavelength']:,.4g}",
                  f"{r['turns_in_training']:,.4g}", f"[{colour[r['band']]}]{r['band']}[/]", *cells)
    console.print(t)
    for m in methods:
        a = lab["attention_factor"][m]
        console.print(f"  {m:8s} {METHOD_HELP.get(m, 'the config.json rope_scaling')}"
                      + (f"  (cos/sin × {a:.4g})" if a != 1.0 else ""))
    console.print("seekwen's RotaryEmbedding keeps a cos/sin table of max_position_embeddings rows and doubles it "
                  "when a longer position arrives, so nothing fails past T: the positions are simply new.")


def plot(lab: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    pairs = [r["pair"] for r in lab["pairs"]]
    for m in lab["pairs"][0]["wavelength_by_method"]:
        ax.plot(pairs, [r["wavelength_by_method"][m] for r in lab["pairs"]], marker=".", label=m)
    T, L = lab["training_length"], lab["length"]
    ax.axhline(T, color="black", ls="--", lw=1, label=f"training context T={T}")
    if L != T:
        ax.axhline(L, color="grey", ls=":", lw=1, label=f"target L={L}")
    ax.set_yscale("log")
    ax.set_xlabel("pair index i  (0 = fast, high frequency → slow, low frequency)")
    ax.set_ylabel("wavelength (tokens per full turn)")
    ax.set_title(f"RoPE wavelengths, theta {lab['theta']:g}, d={lab['rope_dim']}, factor {lab['factor']:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@one_line_errors
def run(args: argparse.Namespace) -> int:
    if args.factor < 1:
        raise ValueError("--factor must be >= 1")
    lab = build(args)
    return emit(args, lab, lambda: print_lab(lab), lambda path: plot(lab, path))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rope",
        help="RoPE per frequency pair: frequency, wavelength, turns in the training context, and each scaling",
        description="For every rotary pair: its frequency, wavelength in tokens and how many full turns it "
        "makes within the training context (fast = many turns, slow = less than one), and how linear, "
        "NTK-aware, HF dynamic NTK, YaRN and Qwen v1 dynamic NTK change the wavelength when extending by "
        "--factor. Uses the engine's own compute_inv_freq. MODEL may be a checkpoint folder, an HF cache "
        "folder, a hub id or a bare config.json file.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, HF cache folder, hub id or config.json (default: the bundled model)")
    p.add_argument("--factor", type=float, default=4.0, help="context extension factor (default 4)")
    p.add_argument("--length", type=int, default=None,
                   help="sequence length the length-dependent rules (dynamic, qwen) are evaluated at "
                   "(default factor × training length)")
    p.add_argument("--train-len", type=int, default=None,
                   help="training context T (default: original_max_position_embeddings, seq_length or "
                   "max_position_embeddings from the config)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--plot", metavar="PNG", default=None, help="draw wavelength vs pair index per method")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)

"""`seekwen context MODEL --text FILE`: the context lab. Perplexity past the training length, with and
without each context-extension method, per evaluation length and per position bucket.

Every method is a config override applied when the checkpoint is loaded (`seekwen.load(path,
config_overrides=...)`), so what is measured is the engine's own implementation of each rule:

- none:    as trained
- linear:  rope_scaling linear, factor L/T (position interpolation)
- ntk:     static NTK-aware: rope_theta × (L/T)^(d/(d-2))
- dynamic: Hugging Face dynamic NTK (rope_scaling dynamic, --dynamic-factor); the base grows with length
- yarn:    rope_scaling yarn, factor L/T, original_max_position_embeddings T
- logn:    Qwen's LogN: queries past T scaled by log_T(position)
- window:  sliding-window attention of T tokens in every layer
where T is the training length and L the evaluation length (static factors are fitted to each L;
at L <= T every factor is 1, so linear/ntk/yarn equal none there).

The same tokens are scored at every length: the first `--tokens` tokens of the text, cut into
windows of L tokens; a token's position is its index inside its window.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..hf.loader import read_config, resolve
from .see import emit, one_line_errors, training_length

METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "logn", "window")


def rope_params(cfg: ModelConfig, **changes) -> dict:
    """A rope_parameters/rope_scaling dict for config.json, keeping the model's theta."""
    return {"rope_theta": cfg.rope.theta, "rope_type": "default", **changes}


def method_overrides(method: str, cfg: ModelConfig, length: int, train_len: int, dynamic_factor: float = 2.0) -> dict:
    """config.json overrides that switch `method` on for sequences of `length` tokens."""
    factor = max(length / train_len, 1.0)
    d = cfg.rope.dim
    rope = None
    if method == "none":
        return {}
    if method == "linear":
        rope = rope_params(cfg, rope_type="linear", factor=factor)
    elif method == "ntk":
        rope = rope_params(cfg)
        rope["rope_theta"] = cfg.rope.theta * factor ** (d / (d - 2))
    elif method == "dynamic":
        rope = rope_params(cfg, rope_type="dynamic", factor=dynamic_factor)
    elif method == "yarn":
        rope = rope_params(cfg, rope_type="yarn", factor=factor, original_max_position_embeddings=train_len)
    elif method == "logn":
        return {"use_logn_attn": True, "seq_length": train_len}
    elif method == "window":
        return {"use_sliding_window": True, "sliding_window": train_len, "max_window_layers": 0}
    else:
        raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    # both spellings, so the override wins whichever the checkpoint uses; max_position_embeddings = T
    # because HF's dynamic rule and the rope table are relative to it
    return {"rope_parameters": rope, "rope_scaling": rope, "rope_theta": rope["rope_theta"],
            "max_position_embeddings": train_len}


def buckets(max_len: int, train_len: int) -> list[tuple[int, int]]:
    """Position buckets [0, T), [T, 2T), [2T, 4T), ... up to max_len."""
    out = [(0, min(train_len, max_len))]
    hi = train_len
    while hi < max_len:
        out.append((hi, min(2 * hi, max_len)))
        hi *= 2
    return out


def bucket_label(b: tuple[int, int]) -> str:
    return f"{b[0]}–{b[1] - 1}"


@dataclass
class Result:
    model: str
    train_len: int
    n_tokens: int
    lengths: list[int]
    methods: list[str]
    ppl: dict[str, dict[int, float]] = field(default_factory=dict)
    by_position: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    # per bucket: ppl / ppl of the same tokens scored by "none" in windows of the training length
    by_position_ratio: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    overrides: dict[str, dict] = field(default_factory=dict)  # at the longest length
    seconds: float = 0.0


@torch.inference_mode()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """ids [L] -> NLL of tokens 1..L-1 given their prefix, [L-1] (float64)."""
    logits = model(ids[None].to(model.device))[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:].to(model.device), reduction="none").double().cpu()


def evaluate(model, ids: torch.Tensor, length: int) -> torch.Tensor:
    """Per-token NLL [len(ids)] scoring ids in windows of `length` tokens (NaN for the first token of each
    window, which has nothing to be predicted from)."""
    nll = torch.full((len(ids),), float("nan"), dtype=torch.float64)
    for start in range(0, len(ids) - length + 1, length):
        nll[start + 1:start + length] = token_nll(model, ids[start:start + length])
    return nll


def perplexity(nll: torch.Tensor, sel: torch.Tensor | None = None) -> float:
    v = nll if sel is None else nll[sel]
    v = v[~v.isnan()]
    return math.exp(float(v.mean())) if len(v) else float("nan")


def by_position(nll: torch.Tensor, length: int, spans: list[tuple[int, int]],
                baseline: torch.Tensor | None) -> tuple[dict[str, float], dict[str, float]]:
    """Perplexity per position bucket, and its ratio to the same tokens' perplexity under `baseline`."""
    pos = torch.arange(len(nll)) % length
    ppl, ratio = {}, {}
    for b in spans:
        sel = (pos >= b[0]) & (pos < b[1]) & ~nll.isnan()
        if not sel.any():
            continue
        ppl[bucket_label(b)] = perplexity(nll, sel)
        if baseline is not None:
            both = sel & ~baseline.isnan()
            ratio[bucket_label(b)] = math.exp(float((nll[both] - baseline[both]).mean()))
    return ppl, ratio


def read_tokens(folder: Path, text_file: str, n_tokens: int) -> torch.Tensor:
    from ..hf.tokenizer import Tokenizer

    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"{text_file}: no such text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{text_file}: not UTF-8 text ({e})") from e
    tok = Tokenizer.from_folder(folder)
    if tok is None:
        raise ValueError(f"{folder}: no tokenizer.json, cannot tokenize {text_file}")
    ids = torch.tensor(tok.encode(text, add_special_tokens=False), dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"{text_file}: too little text ({len(ids)} tokens)")
    return ids[:n_tokens]


def run_lab(args: argparse.Namespace, progress: bool = True) -> Result:
    import time

    import seekwen

    folder = resolve(args.model if args.model else str(_bundled()))
    _, _, cfg = read_config(folder)
    T = args.train_len or training_length(cfg)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method '{m}' (choose from {', '.join(METHODS)})")
    lengths = sorted({int(x) for x in args.lengths.split(",") if x})
    if not lengths or lengths[0] < 2:
        raise ValueError("--lengths must be integers >= 2")
    ids = read_tokens(folder, args.text, args.tokens)
    fitting = [L for L in lengths if L <= len(ids)]
    if not fitting:
        raise ValueError(f"{args.text}: {len(ids)} tokens, shorter than every length in --lengths")
    dropped = [L for L in lengths if L > len(ids)]
    lengths = fitting
    ids = ids[: (len(ids) // lengths[-1]) * lengths[-1]]  # every length scores the same tokens
    res = Result(str(folder), T, len(ids), lengths, methods)
    spans = buckets(lengths[-1], T)
    jobs = [("none", T)] + [(m, L) for m in methods for L in lengths]  # first: the in-distribution baseline
    bar = _progress(len(jobs), progress)
    t0 = time.perf_counter()
    loaded: dict[str, object] = {}
    scored: dict[tuple[str, int], torch.Tensor] = {}
    for m, L in jobs:
        if (m, L) in scored:
            nll = scored[(m, L)]
        else:
            over = method_overrides(m, cfg, L, T, args.dynamic_factor)
            key = json.dumps(over, sort_keys=True)
            if key not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[key] = seekwen.load(folder, dtype="float32", device="cpu", config_overrides=over or None)
            nll = evaluate(loaded[key], ids, L)
        scored[(m, L)] = nll
        if m in methods and L in lengths:
            res.ppl.setdefault(m, {})[L] = perplexity(nll)
            ppl, ratio = by_position(nll, L, spans, scored[("none", T)])
            res.by_position.setdefault(m, {})[L] = ppl
            res.by_position_ratio.setdefault(m, {})[L] = ratio
            if L == lengths[-1]:
                res.overrides[m] = method_overrides(m, cfg, L, T, args.dynamic_factor)
            bar.set_postfix_str(f"{m} L={L} ppl={res.ppl[m][L]:.2f}")
        bar.update(1)
    bar.close()
    res.seconds = time.perf_counter() - t0
    if dropped:
        print(f"note: skipped lengths longer than the text ({len(ids)} tokens): {dropped}")
    return res


def _bundled() -> Path:
    from .common import bundled_model_path

    return bundled_model_path()


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="context lab", unit="run", disable=not enabled, leave=False)


def print_result(res: Result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    T = res.train_len
    console.print(f"[bold]{res.model}[/]: trained at T={T}; {res.n_tokens:,} tokens scored at every length "
                  f"({res.seconds:.0f} s)")
    t = Table(title="perplexity by evaluation length (whole windows)", header_style="bold")
    t.add_column("method")
    for L in res.lengths:
        t.add_column(f"{L}" + (f" ({L / T:g}×T)" if L > T else ""), justify="right")
    for m in res.methods:
        cells = []
        for L in res.lengths:
            v = res.ppl[m][L]
            best = min(res.ppl[x][L] for x in res.methods)
            cell = f"{v:.2f}" if v < 1e4 else f"{v:.3g}"
            cells.append(f"[bold green]{cell}[/]" if v == best and L > T else cell)
        t.add_row(m, *cells)
    console.print(t)
    L = res.lengths[-1]
    labels = list(res.by_position[res.methods[0]][L])
    b = Table(title=f"perplexity by position at length {L} (× the same tokens scored in windows of {T}, no method)",
              header_style="bold")
    b.add_column("method")
    for lab in labels:
        b.add_column(f"pos {lab}", justify="right")
    for m in res.methods:
        b.add_row(m, *[f"{res.by_position[m][L][lab]:.2f} (×{res.by_position_ratio[m][L][lab]:.3f})"
                       for lab in labels])
    console.print(b)


def plot(res: Result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    T = res.train_len
    for m in res.methods:
        a.plot(res.lengths, [res.ppl[m][L] for L in res.lengths], marker="o", label=m)
    a.axvline(T, color="black", ls="--", lw=1, label=f"training length {T}")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("evaluation length L (tokens per window)")
    a.set_ylabel("perplexity")
    a.set_title("whole-window perplexity")
    L = res.lengths[-1]
    labels = list(res.by_position[res.methods[0]][L])
    for m in res.methods:
        b.plot(range(len(labels)), [res.by_position_ratio[m][L][x] for x in labels], marker="o", label=m)
    b.axhline(1.0, color="black", ls="--", lw=1)
    b.set_xticks(range(len(labels)), labels, rotation=20)
    b.set_yscale("log")
    b.set_xlabel(f"token position in a window of L={L}")
    b.set_ylabel(f"ppl / ppl of the same tokens in windows of {T}")
    b.set_title("by position, relative to in-distribution")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    a.legend(fontsize=8)
    fig.suptitle(f"{Path(res.model).name}: past the training length (T={T})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@one_line_errors
def run(args: argparse.Namespace) -> int:
    if args.tokens < 2 or args.dynamic_factor < 1:
        raise ValueError("--tokens must be >= 2 and --dynamic-factor >= 1")
    res = run_lab(args, progress=not args.json)
    return emit(args, res.__dict__, lambda: print_result(res), lambda path: plot(res, path))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "context",
        help="context lab: perplexity past the training length with linear, NTK, dynamic, YaRN, LogN, window",
        description="Score the same held-out tokens in windows of each --lengths value, once per method; "
        "each method is a config override applied at load time (linear/NTK/YaRN fitted to factor L/T, HF "
        "dynamic NTK, Qwen-style LogN, sliding window of T). Prints perplexity per method and length, and per "
        "position bucket at the longest length. Needs weights and a tokenizer.json.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, HF cache folder or hub id (default: the bundled model)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score (use text the model was not trained on)")
    p.add_argument("--lengths", default="128,256,512,1024,2048", help="evaluation lengths (default 128,...,2048)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--tokens", type=int, default=8192,
                   help="tokens scored at every length: the first N of the text, cut to a multiple of the "
                   "longest length (default 8192)")
    p.add_argument("--train-len", type=int, default=None,
                   help="training length T (default: from config.json)")
    p.add_argument("--dynamic-factor", type=float, default=2.0, help="factor of HF dynamic NTK (default 2)")
    p.add_argument("--plot", metavar="PNG", default=None, help="write ppl-vs-length and ppl-vs-position plots")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)

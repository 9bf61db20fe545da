"""`seekwen memory MODEL`: weights, KV cache and attention-score memory at several context lengths,
from config.json alone.

- weights: parameters × bytes per parameter;
- KV cache per token: what this model's attention stores (MHA/GQA: k and v per KV head; MLA: the
  latent c_kv plus the shared rotated key), next to what a plain multi-head cache would need;
- attention scores: a naive kernel materialises S × S scores per head; a tiled flash-style kernel
  keeps only a running max and sum per query row (O(S)) plus one tile in on-chip memory.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from ..config import ModelConfig
from .see import (
    Source,
    count_params,
    dtype_bytes,
    emit,
    human,
    human_bytes,
    meta_model,
    one_line_errors,
    read_model_config,
    training_length,
)

# seed 000, section 6: "Attention Matrix Size" and "Memory (FP16)" for one S x S matrix
SEED_TABLE = [(4096, "16M elements", "32 MB", "1×"), (32768, "1B elements", "2 GB", "64×"),
              (131072, "16B elements", "32 GB", "1024×")]


def mha_values_per_token_layer(cfg: ModelConfig) -> int:
    """The same model with a plain multi-head cache: every query head keeps its own k and v
    (MLA decompressed: heads × (qk_nope + qk_rope + v) per layer)."""
    if cfg.mla is not None:
        m = cfg.mla
        return cfg.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return 2 * cfg.num_heads * cfg.head_dim


def kv_tokens(cfg: ModelConfig, context: int) -> int:
    """Token slots summed over layers: sliding-window layers keep at most `window` tokens."""
    windows = cfg.sliding_window or [None] * cfg.num_layers
    return sum(min(context, w) if w else context for w in windows)


@dataclass
class ContextRow:
    context: int
    kv_cache: int  # bytes, this model's cache, whole batch
    kv_cache_mha: int  # bytes, plain multi-head cache
    scores_head_fp32: int  # bytes, one S x S matrix
    scores_head_dtype: int
    scores_layer_dtype: int  # all heads, whole batch, one layer (the peak of a naive kernel)
    flash_layer: int  # bytes a tiled kernel keeps in memory for one layer: running max + sum per row


@dataclass
class MemoryReport:
    model: str
    dtype: str
    batch: int
    params: int
    weights: int
    attention: str
    kv_per_token: int  # bytes, all layers
    kv_per_token_mha: int
    training_length: int
    rows: list[ContextRow]
    tile: int


def attention_kind(cfg: ModelConfig) -> str:
    if cfg.mla is not None:
        return f"MLA (latent {cfg.mla.kv_lora_rank} + rope key {cfg.mla.qk_rope_head_dim})"
    if cfg.num_kv_heads == cfg.num_heads:
        return f"MHA ({cfg.num_heads} heads × {cfg.head_dim})"
    return f"GQA ({cfg.num_heads} query / {cfg.num_kv_heads} KV heads × {cfg.head_dim})"


def build_report(src: Source, contexts: list[int], batch: int, dtype: str | None, tile: int = 128) -> MemoryReport:
    cfg = src.cfg
    dtype = dtype or cfg.torch_dtype
    nb = dtype_bytes(dtype)
    params = count_params(meta_model(cfg)).total
    H, L = cfg.num_heads, cfg.num_layers
    rows = []
    for S in contexts:
        rows.append(ContextRow(
            context=S,
            kv_cache=batch * kv_tokens(cfg, S) * cfg.kv_values_per_token_layer() * nb,
            kv_cache_mha=batch * S * L * mha_values_per_token_layer(cfg) * nb,
            scores_head_fp32=S * S * 4,
            scores_head_dtype=S * S * nb,
            scores_layer_dtype=batch * H * S * S * nb,
            flash_layer=batch * H * 2 * S * 4,
        ))
    return MemoryReport(
        model=src.where, dtype=dtype, batch=batch, params=params, weights=params * nb,
        attention=attention_kind(cfg),
        kv_per_token=cfg.kv_bytes_per_token(nb),
        kv_per_token_mha=mha_values_per_token_layer(cfg) * L * nb,
        training_length=training_length(cfg), rows=rows, tile=tile,
    )


def seed_check(rows: list[ContextRow]) -> list[tuple[str, str, str, str]]:
    """The seed's numbers next to ours (one S x S fp16 matrix: one head, one layer, one sequence)."""
    by_ctx = {r.context: r for r in rows}
    out = []
    for S, elems, mem, rel in SEED_TABLE:
        fp16 = S * S * 2
        ours = f"{human(S * S)} = {S}² elements, {human_bytes(fp16)}, {(S / 4096) ** 2:g}×"
        extra = ""
        if S in by_ctx:
            r = by_ctx[S]
            extra = f"all heads of one layer: {human_bytes(r.scores_layer_dtype)}; KV cache: {human_bytes(r.kv_cache)}"
        out.append((f"{S // 1024}K", f"{elems}, {mem}, {rel}", ours, extra))
    return out


def print_report(rep: MemoryReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{rep.model}[/]  {rep.attention}, {human(rep.params)} parameters, dtype {rep.dtype}, "
                  f"batch {rep.batch}, training context {rep.training_length} (from config.json)")
    console.print(f"weights: {human_bytes(rep.weights)}   KV cache per token: {human_bytes(rep.kv_per_token)} "
                  f"(as plain MHA: {human_bytes(rep.kv_per_token_mha)}, "
                  f"{rep.kv_per_token_mha / rep.kv_per_token:.1f}× more)")
    t = Table(title="memory by context length", header_style="bold")
    for col in ("context", "KV cache", "KV cache as MHA", "S×S scores / head fp32", f"/ head {rep.dtype}",
                f"/ layer, all heads {rep.dtype}", "flash-style / layer"):
        t.add_column(col, justify="right")
    for r in rep.rows:
        t.add_row(f"{r.context:,}", human_bytes(r.kv_cache), human_bytes(r.kv_cache_mha),
                  human_bytes(r.scores_head_fp32), human_bytes(r.scores_head_dtype),
                  human_bytes(r.scores_layer_dtype), human_bytes(r.flash_layer))
    console.print(t)
    console.print(f"flash-style: a running max and sum (fp32) per query row and head, O(S); the S×S scores live only "
                  f"as {rep.tile}×{rep.tile} tiles in on-chip memory ({human_bytes(rep.tile * rep.tile * 4)} per tile "
                  "in fp32). Naive scores are transient: one layer at a time, never summed over layers.")
    s = Table(title="seed 000 §6 table (fp16, one S×S matrix)", header_style="bold")
    for col in ("context", "seed says", "computed", "for this model"):
        s.add_column(col)
    for row in seed_check(rep.rows):
        s.add_row(*row)
    console.print(s)
    console.print("The seed's arithmetic is right for one head of one layer of one sequence (binary units: "
                  "32 MiB, 2 GiB, 32 GiB). Its code comment '~32MB per batch' is not: the function ignores "
                  "num_heads, and a layer holds heads × that; with flash-style kernels the matrix is never "
                  "stored, and what grows with context is the KV cache, linearly.")


def parse_contexts(text: str) -> list[int]:
    """'4096,32k' -> [4096, 32768]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            out.append(int(item.removesuffix("k")) * (1024 if item.endswith("k") else 1))
        except ValueError as e:
            raise ValueError(f"--context must be comma-separated integers (e.g. 4096,32k), got '{text}'") from e
    if not out or any(c < 1 for c in out):
        raise ValueError(f"--context must be positive integers, got '{text}'")
    return out


@one_line_errors
def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.tile < 1:
        raise ValueError("--batch and --tile must be positive")
    rep = build_report(read_model_config(args.model), parse_contexts(args.context), args.batch, args.dtype, args.tile)
    return emit(args, {**asdict(rep), "seed_check": seed_check(rep.rows)}, lambda: print_report(rep))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory",
        help="weights, KV cache and attention-score memory by context length (config.json is enough)",
        description="Weights memory; KV-cache bytes per token and at each context for this model's attention "
        "(MHA, GQA or MLA latent) and for the same model with a plain multi-head cache; naive S×S attention "
        "scores per head and per layer next to what a tiled flash-style kernel keeps. Also checks the seed "
        "document's 4K/32K/128K table. MODEL may be a checkpoint folder, an HF cache folder, a hub id or a "
        "bare config.json file.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, HF cache folder, hub id or config.json (default: the bundled model)")
    p.add_argument("--context", "-c", default="4096,32768,131072",
                   help="comma-separated context lengths, 'k' = 1024 (default 4096,32768,131072)")
    p.add_argument("--batch", "-b", type=int, default=1, help="sequences in the batch (default 1)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "fp8"],
                   help="bytes per weight and cached value (default: the config's torch_dtype)")
    p.add_argument("--tile", type=int, default=128, help="flash-style tile size (default 128)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)

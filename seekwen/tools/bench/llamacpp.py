"""`seekwen bench --vs-llamacpp GGUF_OR_DIR`: llama.cpp and seekwen on the same GGUF file, in the same run.

llama.cpp is a benchmark peer, never a dependency: its binaries are found in `LLAMA_CPP_BIN` (a folder)
or on PATH (`llama-bench`, optionally `llama-batched-bench`); without them the section says so and is
skipped. What runs, both engines with the same threads:

- llama.cpp: `llama-bench -m FILE -t T -p 32,512 -n N -o json` (prefill 32 / 512 tokens, decode N tokens
  from an empty context) and, when present, `llama-batched-bench -npp 32 -ntg N -npl 1,8 --output-format
  jsonl` (decode of 1 and 8 sequences after 32-token prompts; `-npl 1,8,1`: see llama_batched);
- seekwen: `seekwen.load(FILE)` (the fast path), prefill 32 / 512 and decode at batch 1 and 8 after
  32-token prompts, through the bench's runners (median step time, best of --repeats).
Printed: tokens/s of each, seekwen / llama.cpp, and each engine's batch-1 decode as a fraction of the
read-bandwidth roofline (the weight bytes a token reads: llama.cpp the file's tensors as stored,
seekwen its own parameters as loaded; untied embedding rows and unchosen experts not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import UserError
from .report import line
from .roofline import decode_bytes
from .runners import Ours, interleaved, time_decode, time_prefill


@dataclass
class LlamaCpp:
    """The llama.cpp binaries this run compares against."""

    bench: Path
    batched: Path | None

    def version(self) -> str:
        r = subprocess.run([str(self.bench), "--version"], capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "unknown"


def find_llamacpp() -> LlamaCpp | None:
    """`LLAMA_CPP_BIN/llama-bench`, else `llama-bench` on PATH; None when neither is there."""
    folder = os.environ.get("LLAMA_CPP_BIN")
    bench = Path(folder) / "llama-bench" if folder else None
    if bench is None or not bench.is_file():
        found = shutil.which("llama-bench")
        bench = Path(found) if found else None
    if bench is None:
        return None
    batched = bench.parent / "llama-batched-bench"
    return LlamaCpp(bench, batched if batched.is_file() else None)


def failed(tool: str, gguf: Path, r: subprocess.CompletedProcess) -> str:
    """What to say when a llama.cpp tool fails: its exit status and its own error lines (llama.cpp says
    why a file does not load, e.g. a metadata key its loader requires), else the end of its stderr."""
    text = (r.stderr or "") + (r.stdout or "")
    errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    why = "; ".join(errors[-3:]) if errors else text.strip()[-500:]
    return f"{tool} failed on {gguf} (exit status {r.returncode}): {why}"


def llama_bench(ll: LlamaCpp, gguf: Path, threads: int, n_gen: int, repeats: int) -> dict[str, float]:
    """llama-bench's tokens/s: {"prefill 32": .., "prefill 512": .., "decode b1": ..}."""
    cmd = [str(ll.bench), "-m", str(gguf), "-t", str(threads), "-p", "32,512", "-n", str(n_gen),
           "-r", str(repeats), "-o", "json"]
    print(f"  $ {' '.join(cmd)}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise UserError(failed("llama-bench", gguf, r))
    out = {}
    for row in json.loads(r.stdout):
        key = f"prefill {row['n_prompt']}" if row["n_gen"] == 0 else "decode b1"
        out[key] = float(row["avg_ts"])
    return out


def llama_batched(ll: LlamaCpp, gguf: Path, threads: int, n_gen: int) -> dict[str, float]:
    """llama-batched-bench's decode tokens/s of 1 and 8 sequences after 32-token prompts."""
    cmd = [str(ll.batched), "-m", str(gguf), "-t", str(threads), "-c", str(8 * (32 + n_gen) + 64),
           "-npp", "32", "-ntg", str(n_gen), "-npl", "1,8,1", "--output-format", "jsonl"]
    print(f"  $ {' '.join(cmd)}")
    out: dict[str, float] = {}
    # its asynchronous logger sometimes loses the last line at exit: a cheap repeat of batch 1 comes last
    # (the first figure of each batch size is kept), and a run still short of a size is repeated
    for _ in range(3):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise UserError(failed("llama-batched-bench", gguf, r))
        for text in r.stdout.splitlines():
            if text.startswith("{"):
                row = json.loads(text)
                out.setdefault(f"decode b{row['pl']} (after 32)", float(row["speed_tg"]))
        if len(out) == 2:
            break
    return out


def file_decode_bytes(path: Path, model) -> int:
    """Weight bytes llama.cpp reads per batch-1 token from the file as stored: every tensor but the token
    embedding (unless tied to the head), routed experts at top_k / n_experts."""
    from ...gguf import GGUFFile

    cfg = model.cfg
    f = GGUFFile(path)
    total = 0
    for name, t in f.tensors.items():
        if name == "token_embd.weight" and "output.weight" in f.tensors:
            continue
        frac = cfg.moe.top_k / cfg.moe.n_routed_experts if "_exps." in name and cfg.moe else 1.0
        total += int(t.data.nbytes * frac)
    return total


def ours(model, args: argparse.Namespace, prompts: torch.Generator) -> dict[str, float]:
    """seekwen's tokens/s on the same measurements."""
    r = Ours(model)
    vocab = model.cfg.vocab_size
    out = {}
    for S in (32, 512):
        if S + 1 > model.cfg.max_position_embeddings:  # (a prefill leaves room for one more token)
            continue
        ids = torch.randint(0, vocab, (1, S), generator=prompts)
        out[f"prefill {S}"] = S / interleaved([r], lambda r, ids=ids: time_prefill(r, ids), args.repeats)["seekwen"]
    for B in (1, 8):
        ids = torch.randint(0, vocab, (B, 32), generator=prompts)
        t = interleaved([r], lambda r, ids=ids: time_decode(r, ids, args.decode_tokens), args.repeats)["seekwen"]
        out[f"decode b{B} (after 32)"] = B / t
    return out


def run_vs_llamacpp(args: argparse.Namespace, bw: float) -> int:
    """The section; 0 also when skipped (no llama.cpp here), with the reason printed."""
    import seekwen

    from ...gguf import gguf_file
    from ...gguf.loader import tensor_types
    from ...gguf.reader import GGUFFile

    path = gguf_file(args.vs_llamacpp)
    print(f"\n== {path}: seekwen vs llama.cpp, {torch.get_num_threads()} threads")
    f = GGUFFile(path)
    types = ", ".join(f"{k} x{v}" for k, v in sorted(tensor_types(f).items()))
    print(f"  {f.arch}, tensors: {types}")
    del f
    ll = find_llamacpp()
    if ll is None:
        print("  llama.cpp not found (set LLAMA_CPP_BIN to the folder holding llama-bench, or put it on PATH): "
              "skipped; seekwen alone:")
    threads = torch.get_num_threads()
    theirs: dict[str, float] = {}
    if ll is not None:
        print(f"  llama.cpp: {ll.version()} ({ll.bench.parent})")
        theirs = llama_bench(ll, path, threads, args.decode_tokens, max(args.repeats, 2))
        if ll.batched is not None:
            theirs.update(llama_batched(ll, path, threads, args.decode_tokens))
        else:
            print("  (no llama-batched-bench beside llama-bench: batch-8 decode is seekwen only)")
    # loaded after llama.cpp's runs, so a big file's llama.cpp figures never share memory with our copy
    model = seekwen.load(path, dtype=args.dtype or "float32", device="cpu", quantize=args.quantize)
    with torch.inference_mode():
        mine = ours(model, args, torch.Generator().manual_seed(0))
    for key in ("prefill 32", "prefill 512", "decode b1", "decode b1 (after 32)", "decode b8 (after 32)"):
        vals = {k: v for k, v in (("llama.cpp", theirs.get(key)), ("seekwen", mine.get(key))) if v is not None}
        if vals:
            line(key, vals, "tok/s", _ratio(vals))
    _roofline(path, model, bw, theirs, mine)
    return 0


def _ratio(vals: dict[str, float]) -> str:
    if len(vals) < 2:
        return ""
    return f"  [seekwen / llama.cpp {vals['seekwen'] / vals['llama.cpp']:.2f}x]"


def _roofline(path: Path, model, bw: float, theirs: dict[str, float], mine: dict[str, float]) -> None:
    ours_bytes, file_bytes = decode_bytes(model), file_decode_bytes(path, model)
    text = f"  roofline at {bw:.1f} GB/s: seekwen reads {ours_bytes / 1e6:.1f} MB/token"
    if "decode b1 (after 32)" in mine:
        text += f" ({ours_bytes * mine['decode b1 (after 32)'] / 1e9 / bw:.0%} at batch 1)"
    text += f", the file {file_bytes / 1e6:.1f} MB/token"
    tok = theirs.get("decode b1 (after 32)") or theirs.get("decode b1")
    if tok:
        text += f" (llama.cpp {file_bytes * tok / 1e9 / bw:.0%} at batch 1)"
    print(text)

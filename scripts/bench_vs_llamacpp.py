"""seekwen vs llama.cpp on the bench's synthetic shapes, one GGUF file per weight type.

Writes `seekwen bench`'s built-in checkpoint (default: `dense`, Qwen2.5-0.5B's shape) as GGUF files the way
llama.cpp's converter writes them (tests/gguf_writer.py; a placeholder byte-level vocabulary, since the
synthetic checkpoint has no tokenizer and llama.cpp needs one to load), then runs
`seekwen bench --vs-llamacpp FILE` on each. llama.cpp's binaries: LLAMA_CPP_BIN or PATH.

    LLAMA_CPP_BIN=/work/llama/build/bin python scripts/bench_vs_llamacpp.py --types f32,q8_0,q4_0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gguf_writer import write_gguf  # noqa: E402

from seekwen.tools.bench.checkpoints import build_checkpoint  # noqa: E402


def placeholder_vocab(n: int) -> dict:
    """A loadable byte-level BPE vocabulary of n tokens: the 256 byte symbols, one merge, fillers."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, alphabet[0] + alphabet[1]]
    tokens += [f"<t{i}>" for i in range(len(tokens), n)]
    return dict(tokens=tokens[:n], types=[1] * n, merges=[f"{alphabet[0]} {alphabet[1]}"], pre="default",
                bos=0, eos=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dense", help="built-in bench shape (seekwen/tools/bench/checkpoints.py)")
    p.add_argument("--types", default="f32,q8_0,q4_0", help="GGUF types to bench (f32, f16, bf16, q8_0, q4_0)")
    p.add_argument("--cache-dir", default="~/.cache/seekwen/bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    folder = build_checkpoint(args.model, args.cache_dir)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    for kind in args.types.split(","):
        out = folder.parent / f"{args.model}-{kind}.gguf"
        if not out.is_file():
            print(f"writing {out}", flush=True)
            write_gguf(folder, out, kind.upper(), tokenizer=placeholder_vocab(vocab))
        cmd = [sys.executable, "-m", "seekwen", "bench", "--vs-llamacpp", str(out), "--threads", str(args.threads),
               "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""seekwen vs llama.cpp on the bench's synthetic shapes, one GGUF file per weight type.

Writes `seekwen bench`'s built-in checkpoint (default: `dense`, Qwen2.5-0.5B's shape) as GGUF files the way
llama.cpp's converter writes them (tests/gguf_writer.py; a placeholder byte-level vocabulary, since the
synthetic checkpoint has no tokenizer and llama.cpp needs one to load), then runs
`seekwen bench --vs-llamacpp FILE` on each. llama.cpp's binaries: LLAMA_CPP_BIN or PATH.

    LLAMA_CPP_BIN=/work/llama/build/bin python scripts/bench_vs_llamacpp.py --types f32,q8_0,q4_0 --threads 2

`--layers N` changes the shape's layer count; the GGUF file is then written straight from random
tensors, one layer at a time (no checkpoint on disk, memory bounded by a layer plus the encoded file).
`--model moe --layers 26` is how the DeepSeek-V2-Lite shape reaches llama.cpp: its deepseek2 loader
takes a model without q_lora_rank (V2-Lite) only at 26 or 27 layers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import re  # noqa: E402

import torch  # noqa: E402
from gguf_writer import converted, write_gguf  # noqa: E402

from seekwen.tools.bench.checkpoints import BENCH_MODELS, _per_expert, build_checkpoint  # noqa: E402


def placeholder_vocab(n: int) -> dict:
    """A loadable byte-level BPE vocabulary of n tokens: the 256 byte symbols, one merge, fillers."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, alphabet[0] + alphabet[1]]
    tokens += [f"<t{i}>" for i in range(len(tokens), n)]
    return dict(tokens=tokens[:n], types=[1] * n, merges=[f"{alphabet[0]} {alphabet[1]}"], pre="default",
                bos=0, eos=1)


def random_tensors(cfg: dict, seed: int = 0):
    """The `converted` tensors of a random checkpoint of config `cfg`, as `build_checkpoint` fills one
    (norms 1, the rest N(0, 0.02^2)), generated and yielded one layer at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(hf_cfg).state_dict().items()}
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    groups: dict[str, list[str]] = {}
    for key in shapes:
        m = re.match(r"model\.layers\.(\d+)\.", key)
        groups.setdefault(m.group(0) if m else "", []).append(key)
    g = torch.Generator().manual_seed(seed)
    for keys in groups.values():
        state = {k: torch.ones(shapes[k]) if "norm" in k else torch.randn(shapes[k], generator=g) * 0.02
                 for k in keys}
        yield from converted(_per_expert(state), cfg)


def gguf_file(args, kind: str) -> Path:
    """The bench shape's GGUF file of `kind`, written once."""
    if args.layers is None:
        folder = build_checkpoint(args.model, args.cache_dir)
        out, tensors = folder.parent / f"{args.model}-{kind}.gguf", None
    else:
        folder = Path(args.cache_dir).expanduser() / f"{args.model}{args.layers}"
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {**BENCH_MODELS[args.model], "num_hidden_layers": args.layers}
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        out, tensors = folder.parent / f"{args.model}{args.layers}-{kind}.gguf", random_tensors(cfg)
    if not out.is_file():
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        print(f"writing {out}", flush=True)
        part = out.with_suffix(".part")
        write_gguf(folder, part, kind.upper(), tokenizer=placeholder_vocab(vocab), tensors=tensors)
        part.rename(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dense", help="built-in bench shape (seekwen/tools/bench/checkpoints.py)")
    p.add_argument("--types", default="f32,q8_0,q4_0", help="GGUF types to bench (f32, f16, bf16, q8_0, q4_0)")
    p.add_argument("--cache-dir", default="~/.cache/seekwen/bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="the shape with this many layers (see above)")
    args = p.parse_args()
    for kind in args.types.split(","):
        out = gguf_file(args, kind)
        cmd = [sys.executable, "-m", "seekwen", "bench", "--vs-llamacpp", str(out), "--threads", str(args.threads),
               "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

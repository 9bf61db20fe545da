"""Rebuild tests/fixtures/gguf: tiny random HF checkpoints (seeded, weights rounded to fp16 values so an F16
GGUF of them is lossless) with a small trained byte-level BPE tokenizer, converted by llama.cpp's REAL
converter (`convert_hf_to_gguf.py`) to F16 and Q8_0, and by `llama-quantize` to Q4_0 and Q4_K_M when a
llama.cpp build is there.

    python scripts/make_gguf_fixtures.py --llama-src /work/llama/src [--llama-bin /work/llama/build/bin]

The converter recognises a tokenizer's pre-tokenizer by hashing how it encodes a test string, which only
the published tokenizers match; this script tells it which one the tiny tokenizer uses (the one
function `get_vocab_base_pre` is replaced, nothing that writes tensors or other metadata). Needs torch,
transformers and the converter's own gguf-py (it puts `<llama-src>/gguf-py` on the path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hf_models import _YARN, SPECS, build_hf_model, save_hub_checkpoint  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "gguf"
VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, bos_token_id=None, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    # name: (spec, the tokenizer's pre-tokenizer as llama.cpp names it, its special tokens)
    "qwen2": (dataclasses.replace(SPECS["qwen2"], kwargs={**SPECS["qwen2"].kwargs, **SMALL, "intermediate_size": 128,
                                                          "tie_word_embeddings": True}), "qwen2",
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "qwen3": (dataclasses.replace(SPECS["qwen3"], kwargs={**SPECS["qwen3"].kwargs, **SMALL, "head_dim": 32}), "qwen2",
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "deepseek_v3": (dataclasses.replace(SPECS["deepseek_v3"], kwargs={**SPECS["deepseek_v3"].kwargs, **SMALL},
                                        rope=dict(_YARN, mscale=0.707, mscale_all_dim=0.707)), "deepseek-v3",
                    ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]),
}
TEXT = [
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.",
    "And God said, Let there be light: and there was light. 1234567 3.14159 it's they're we'll I'd",
    "ümlaut café 日本語テキスト 中文 한국어  leading  spaces\n\nand\ttabs",
]
WRAPPER = """
import sys
sys.path[:0] = [{src!r}, {src!r} + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *{argv!r}]
convert_hf_to_gguf.main()
"""


def train_tokenizer(folder: Path, pre: str, special: list[str]) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(ROOT))
    from seekwen.gguf.tokenizer import PRE_TOKENIZERS

    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    bos, eos, pad = (special[0], special[1], special[2]) if pre == "deepseek-v3" else (None, special[2], special[0])
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": pre == "deepseek-v3", "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }, indent=2, ensure_ascii=False))


def make_checkpoint(name: str, folder: Path) -> None:
    spec, pre, special = FAMILIES[name]
    if pre == "deepseek-v3":
        ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, **ids})
    model = build_hf_model(spec, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # fp16 values: the F16 GGUF holds them exactly
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_(b.half().float())
    save_hub_checkpoint(model.half(), spec, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").unlink(missing_ok=True)
    train_tokenizer(folder, pre, special)


def convert(src: Path, hf: Path, out: Path, outtype: str, pre: str) -> None:
    argv = [str(hf), "--outtype", outtype, "--outfile", str(out)]
    code = WRAPPER.format(src=str(src), pre=pre, argv=argv)
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-src", type=Path, required=True, help="llama.cpp source (convert_hf_to_gguf.py)")
    ap.add_argument("--llama-bin", type=Path, default=None, help="folder with llama-quantize (optional)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args()
    for name in args.families.split(","):
        folder = OUT / name
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "hf").mkdir(parents=True)
        make_checkpoint(name, folder / "hf")
        pre = FAMILIES[name][1]
        for outtype in ("f16", "q8_0"):
            convert(args.llama_src, folder / "hf", folder / f"{name}-{outtype}.gguf", outtype, pre)
        quantize = args.llama_bin / "llama-quantize" if args.llama_bin else None
        if quantize and quantize.is_file():
            for kind in ("q4_0", "q4_k_m"):
                subprocess.run([str(quantize), str(folder / f"{name}-f16.gguf"), str(folder / f"{name}-{kind}.gguf"),
                                kind.upper()], check=True, capture_output=True)
        print(name, sorted((f.name, f.stat().st_size) for f in folder.rglob("*") if f.is_file()))


if __name__ == "__main__":
    main()

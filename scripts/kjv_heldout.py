#!/usr/bin/env python3
"""Write the bundled model's held-out text: the validation chunks `seekwen train` never trained on.

The bundled model was trained on the whole King James Bible (scripts/train_bundled.sh): the token
stream is cut into chunks of seq_len + 1 tokens and every `val_every`-th chunk is held out
(seekwen/train/data.py). This rebuilds that stream with the bundled tokenizer, takes the held-out
chunks in order and writes them decoded, one chunk per paragraph. Adjacent chunks are ~50 chunks
apart in the Bible, so context longer than one chunk is real KJV text but not a continuation.

    bible Gen1:1-Rev22:21 | python3 scripts/prep_kjv.py > runs/kjv.txt
    python3 scripts/kjv_heldout.py runs/kjv.txt > runs/kjv-heldout.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer

from seekwen.tools.common import bundled_model_path
from seekwen.train.data import read_texts, split, tokenize


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", help="the training text (output of scripts/prep_kjv.py)")
    p.add_argument("--model", default=str(bundled_model_path()), help="folder with the tokenizer.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-every", type=int, default=50)
    args = p.parse_args()
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    ids = tokenize(tok, read_texts([args.text]))
    val = split(ids, args.seq_len, args.val_every).val
    for chunk in val.tolist():
        sys.stdout.write(tok.decode(chunk, skip_special_tokens=True).strip() + "\n\n")
    print(f"{len(val)} held-out chunks of {args.seq_len + 1} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

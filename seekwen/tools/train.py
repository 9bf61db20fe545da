"""`seekwen train`: train a model of any supported family from text files; writes a Hugging Face
checkpoint that resumes exactly (`--resume`) and loads with `seekwen.load` and transformers.

    torchrun --standalone --nproc-per-node 2 -m seekwen train TEXT --out RUN [--fsdp]

runs it data-parallel (DDP; FSDP2 with --fsdp): --batch-size stays the global batch (seekwen/train/distributed.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from text files (HF checkpoint out, exact resume)",
                       description="Train a model from text files. Writes a Hugging Face checkpoint into --out.")
    p.add_argument("texts", nargs="*", help="UTF-8 text file(s) to train on (optional with --resume)")
    p.add_argument("--out", "-o", required=True, help="output folder: HF checkpoint + resume state")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="model config.json (Hugging Face format, any supported model_type)")
    src.add_argument("--preset", help="named model config: kjv-v3 (the bundled model), tiny-v3")
    p.add_argument("--tokenizer", help="folder with tokenizer.json to use (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when training one")
    p.add_argument("--seq-len", type=int, default=256, help="training context in tokens")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per optimizer step; under torchrun the global batch, split evenly over the ranks")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default: 10%% of the steps, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-every", type=int, default=50, help="hold out every n-th chunk for validation")
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--save-interval", type=int, default=500)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--bias-update-rate", type=float, default=1e-3,
                   help="DeepSeek-V3 auxiliary-loss-free balancing: bias step u per optimizer step")
    p.add_argument("--seq-aux-alpha", type=float, default=0.0,
                   help="weight of DeepSeek-V3's sequence-wise balance loss (0: off)")
    p.add_argument("--mtp-layers", type=int, default=None,
                   help="DeepSeek-V3 multi-token-prediction layers to train (num_nextn_predict_layers; "
                        "deepseek_v3 configs only; default: the config's)")
    p.add_argument("--mtp-weight", type=float, default=0.3,
                   help="lambda: weight of the MTP cross-entropy (mean over MTP depths), as in the V3 report")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from this checkpoint's weights (default config and tokenizer: its own); "
                        "parameters it lacks, such as new --mtp-layers, are freshly initialised")
    p.add_argument("--train-only", choices=["mtp"], default=None,
                   help="mtp: train only the MTP layers, the main model frozen (its outputs stay exactly "
                        "as they were; with --init-from, adds speculation to a trained model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2 fully_shard) "
                        "instead of replicating them (DDP)")
    p.add_argument("--export", help="also write a clean HF checkpoint (no resume files) here at the end")
    p.add_argument("--export-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    positive = ("vocab_size", "seq_len", "batch_size", "steps", "eval_interval", "save_interval", "log_interval")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        raise UserError("--lr must be > 0")
    if not 0 <= args.min_lr_ratio <= 1:
        raise UserError("--min-lr-ratio must be in [0, 1]")
    if args.warmup is not None and args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.mtp_layers is not None and args.mtp_layers < 0:
        raise UserError("--mtp-layers must be >= 0")
    for name in ("weight_decay", "grad_clip", "val_every", "bias_update_rate", "seq_aux_alpha", "mtp_weight"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    if not args.resume and not args.texts:
        raise UserError("give at least one text file to train on")


def _model_config(args: argparse.Namespace) -> dict:
    from ..train.presets import preset

    if args.init_from and not args.preset and not args.config:
        args.config = str(Path(args.init_from) / "config.json")
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from e
    return preset(args.preset or "kjv-v3")


def _with_mtp(model: dict, layers: int | None) -> dict:
    """The model config with --mtp-layers applied (DeepSeek-V3 architecture only)."""
    if layers is None:
        return model
    if layers and model.get("model_type") != "deepseek_v3":
        raise UserError(f"--mtp-layers needs a deepseek_v3 model config, not {model.get('model_type')!r}")
    return {**model, "num_nextn_predict_layers": layers}


def run(args: argparse.Namespace) -> int:
    from ..tools.common import pick_device
    from ..train import TrainConfig, Trainer

    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    steps = args.steps or 1000
    warmup = args.warmup if args.warmup is not None else min(100, max(1, steps // 10))
    model = _with_mtp(_model_config(args), args.mtp_layers)
    cfg = TrainConfig(
        model=model, texts=[str(Path(t).resolve()) for t in args.texts], out=args.out,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size,
        steps=steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, val_every=args.val_every,
        eval_interval=args.eval_interval, save_interval=args.save_interval, log_interval=args.log_interval,
        seed=args.seed, bias_update_rate=args.bias_update_rate, seq_aux_alpha=args.seq_aux_alpha,
        mtp_weight=args.mtp_weight, device=device,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None, train_only=args.train_only,
    )
    if args.init_from and cfg.tokenizer is None:
        cfg.tokenizer = cfg.init_from  # the checkpoint's own tokenizer (its ids are what its weights mean)
    trainer = Trainer(cfg, resume=args.resume, log=_logger(args.quiet), steps=args.steps, fsdp=args.fsdp)
    log = trainer.log  # rank 0's; silent on the other ranks
    if args.resume and args.texts:
        log("note: --resume uses the text files and settings saved with the run")
    _describe(trainer, log)
    trainer.run(progress=not args.quiet)
    if args.export:
        dtype = torch.bfloat16 if args.export_dtype == "bfloat16" else torch.float32
        log(f"exported {trainer.export(args.export, dtype)}")
    return 0


def _logger(quiet: bool):
    if quiet:
        return lambda msg: print(msg, flush=True)
    from tqdm import tqdm

    return lambda msg: tqdm.write(msg)


def _describe(trainer, log) -> None:
    from ..train.params import count_params

    total, active = count_params(trainer.model)
    c = trainer.cfg
    log(f"model {trainer.model_cfg.model_type}: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; "
        f"{len(trainer.split.train):,} training tokens, {len(trainer.split.val):,} validation chunks of {c.seq_len}; "
        f"{c.steps} steps x {c.batch_size * c.seq_len:,} tokens")
    dp = trainer.dp
    if dp.world > 1:
        log(f"data parallel: {dp.world} ranks ({'FSDP2' if dp.fsdp else 'DDP'}), {c.batch_size // dp.world} "
            f"sequences each per step (--batch-size {c.batch_size} is the global batch)")

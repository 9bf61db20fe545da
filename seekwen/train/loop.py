"""The training loop: AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on CUDA,
DeepSeek-V3 load balancing, periodic validation, and checkpoints that resume exactly.

A checkpoint is the output folder itself: a Hugging Face checkpoint (config.json, model.safetensors in
fp32, tokenizer.json, tokenizer_config.json, generation_config.json) plus two side files that loaders
ignore: `optimizer.safetensors` (AdamW moments and step counts per parameter, RNG states) and
`trainer_state.json` (step, data position, the training settings, validation history). No pickles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from ..hf.export import save_hf
from ..hf.families import parse_config
from ..hf.loader import build
from ..model.mtp import mtp_logits, share_embeddings
from . import balance
from .bpe import save_tokenizer, special_ids, train_bpe
from .data import Batches, Split, read_texts, split, stream_hash, text_lines, tokenize
from .init import init_weights

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"


@dataclass
class TrainConfig:
    model: dict  # Hugging Face config.json (vocab_size is set from the tokenizer)
    texts: list[str]
    out: str
    tokenizer: str | None = None  # folder with tokenizer.json (+ tokenizer_config.json); None: train one
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    val_every: int = 50  # every n-th chunk of the text is held out
    eval_interval: int = 200
    save_interval: int = 500
    log_interval: int = 50
    seed: int = 0
    bias_update_rate: float = 1e-3  # DeepSeek-V3 auxiliary-loss-free balancing speed u
    seq_aux_alpha: float = 0.0  # DeepSeek-V3 sequence-wise balance loss weight (0: off)
    mtp_weight: float = 0.3  # lambda on the multi-token-prediction loss (model config num_nextn_predict_layers)
    init_from: str | None = None  # start from this checkpoint's weights (parameters it lacks: initialised)
    train_only: str | None = None  # "mtp": train the MTP layers only, the main model frozen
    device: str = "cpu"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["betas"] = tuple(d.get("betas", (0.9, 0.95)))
        return cls(**d)


@dataclass
class History:
    train: list[dict] = field(default_factory=list)  # {"step", "loss", "tokens_per_s", "lr"}
    val: list[dict] = field(default_factory=list)  # {"step", "loss", "ppl"}
    load: list[dict] = field(default_factory=list)  # {"step", "layers": {layer: stats}}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def _autocast(device: str):
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print, steps: int | None = None):
        """With `resume`, the run saved in `cfg.out` continues with its saved settings (only the device
        and, when given, the total number of `steps` change)."""
        self.log = log
        self.out = Path(cfg.out)
        state = self._read_state() if resume else None
        if state is not None:
            device = cfg.device
            cfg = TrainConfig.from_json(state["config"])
            cfg.device = device
        if steps is not None:
            cfg.steps = steps
        self.cfg = cfg
        self.device = cfg.device
        torch.manual_seed(cfg.seed)
        self.tok = self._tokenizer(state)
        self._prepare_data(state)
        raw = {**cfg.model, "vocab_size": self.tok.get_vocab_size(), **special_ids(self.tok)}
        self.model_cfg = parse_config(raw, "model config")
        self.model = build(self.model_cfg, torch.float32, self.device)
        share_embeddings(self.model)  # MTP layers read and write through the main embedding and head
        if cfg.train_only is not None:
            self._freeze(cfg.train_only)
        self.step = 0
        self._last_counts: dict[int, torch.Tensor] = {}
        self.history = History()
        self.optimizer = self._optimizer()
        if state is None:
            init_weights(self.model, std=float(raw.get("initializer_range", 0.02)))
            if cfg.init_from is not None:
                self._init_from(Path(cfg.init_from))
        else:
            self._restore(state)

    # ------------------------------------------------------------------ setup
    def _prepare_data(self, state: dict | None) -> None:
        cfg = self.cfg
        ids = tokenize(self.tok, read_texts(cfg.texts))
        if state is not None and state["data"]["hash"] != stream_hash(ids):
            raise ValueError(f"{self.out}: the training text differs from the one this run started with")
        self.data_hash = stream_hash(ids)
        self.split: Split = split(ids, cfg.seq_len, cfg.val_every)
        self.batches = Batches(self.split.train, cfg.seq_len, cfg.batch_size, cfg.seed)
        if self.batches.batches_per_epoch() < 1:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the training data allows")

    def _read_state(self) -> dict | None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nothing to resume (no trainer state in this folder)")
        return json.loads(path.read_text())

    def _tokenizer(self, state: dict | None) -> Tokenizer:
        source = self.out if state is not None else self.cfg.tokenizer
        if source is not None:
            path = Path(source) / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no tokenizer.json")
            return Tokenizer.from_file(str(path))
        self.log(f"training a byte-level BPE tokenizer (vocab {self.cfg.vocab_size})")
        return train_bpe(text_lines(read_texts(self.cfg.texts)), self.cfg.vocab_size)

    def _freeze(self, part: str) -> None:
        """Train only `part` ("mtp": the MTP layers' own parameters; the embedding and head they share
        with the main model stay frozen with it, so the main model's outputs do not change at all)."""
        if part != "mtp":
            raise ValueError(f"train_only must be 'mtp' or None, got {part!r}")
        if len(self.model.mtp) == 0:
            raise ValueError("train_only='mtp' needs MTP layers (--mtp-layers N, deepseek_v3 configs)")
        for name, p in self.model.named_parameters():  # tied embed/head are listed once, as the main ones
            p.requires_grad_(name.startswith("mtp."))

    def _init_from(self, folder: Path) -> None:
        """Copy a checkpoint's weights into the model; what it lacks (e.g. new MTP layers) keeps its init."""
        from ..hf.loader import load

        src = load(folder, dtype=torch.float32, device=self.device, fast=False, mtp=False)
        if src.cfg.vocab_size != self.model_cfg.vocab_size:
            raise ValueError(f"{folder}: vocabulary {src.cfg.vocab_size} != this run's {self.model_cfg.vocab_size}")
        missing, unexpected = self.model.load_state_dict(src.state_dict(), strict=False)
        lacking = [k for k in missing if not k.startswith("mtp.")]
        if unexpected or lacking:
            raise ValueError(f"{folder}: its weights do not fit this model config "
                             f"(unexpected {unexpected[:3]}, missing {lacking[:3]})")
        share_embeddings(self.model)
        self.log(f"initialised from {folder} ({len(missing)} MTP tensors freshly initialised)")

    def _optimizer(self) -> torch.optim.AdamW:
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas, eps=1e-8)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> float:
        cfg, model = self.cfg, self.model
        model.train()
        lr = lr_at(cfg, self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = self.batches.next().to(self.device)
        balance.set_recording(model, indices=True, scores=cfg.seq_aux_alpha > 0)
        mtp_only = cfg.train_only == "mtp"
        with _autocast(self.device), torch.set_grad_enabled(not mtp_only):  # frozen main: no graph for it
            logits, hidden = model(batch[:, :-1], return_hidden=True)
        loss = _ce(logits, batch[:, 1:])
        total = 0.0 if mtp_only else loss
        if len(model.mtp):
            total = total + (1.0 if mtp_only else cfg.mtp_weight) * self._mtp_loss(hidden, batch)
        if cfg.seq_aux_alpha > 0:
            total = total + cfg.seq_aux_alpha * balance.sequence_balance_loss(model, batch.shape[0])
        total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = balance.expert_counts(model)
        if mtp_only:  # the frozen main model's router biases stay as they are
            counts = {i: c for i, c in counts.items() if i >= self.model_cfg.num_layers}
        balance.update_bias(model, counts, cfg.bias_update_rate)
        balance.set_recording(model, indices=False, scores=False)
        self.step += 1
        self._last_counts = counts
        return float(loss.detach())

    def _mtp_loss(self, hidden: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's MTP objective: the mean over depths k of the cross-entropy of t_{i+k+1}."""
        with _autocast(self.device):
            depths = mtp_logits(self.model, hidden, batch)
        losses = [_ce(lg, batch[:, k + 1 :]) for k, lg in enumerate(depths, start=1)]
        self._last_mtp = [float(x.detach()) for x in losses]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean cross-entropy (nats/token) and perplexity over every held-out chunk."""
        self.model.eval()
        val = self.split.val
        if len(val) == 0:
            return {"step": self.step, "loss": float("nan"), "ppl": float("nan")}
        total, n = 0.0, 0
        mtp_total, mtp_hits, mtp_n = 0.0, 0, 0
        for i in range(0, len(val), self.cfg.batch_size):
            chunk = val[i : i + self.cfg.batch_size].long().to(self.device)
            with _autocast(self.device):
                logits, hidden = self.model(chunk[:, :-1], return_hidden=True)
                depth1 = mtp_logits(self.model, hidden, chunk)[:1]
            total += float(_ce(logits, chunk[:, 1:], reduction="sum"))
            n += chunk[:, 1:].numel()
            for lg in depth1:  # the first MTP layer: its loss, and how often its argmax is the
                target = chunk[:, 2:]  # main model's own greedy choice (what greedy speculation accepts)
                mtp_total += float(_ce(lg, target, reduction="sum"))
                mtp_hits += int((lg.argmax(-1) == logits[:, 1:].argmax(-1)).sum())
                mtp_n += target.numel()
        mean = total / n
        rec = {"step": self.step, "loss": mean, "ppl": math.exp(min(mean, 50.0))}
        if mtp_n:
            rec.update(mtp_loss=mtp_total / mtp_n, mtp_agree=mtp_hits / mtp_n)
        return rec

    # ------------------------------------------------------------------ loop
    def run(self, stop_at: int | None = None, progress: bool = True) -> History:
        """Train to `cfg.steps` (or stop, with a checkpoint, at `stop_at`); returns the history."""
        cfg = self.cfg
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        bar = _progress(self.step, cfg.steps, progress)
        window_loss, window_tokens, t0 = 0.0, 0, time.perf_counter()
        load_counts: dict[int, torch.Tensor] = {}
        while self.step < end:
            loss = self.train_step()
            window_loss += loss
            window_tokens += cfg.batch_size * cfg.seq_len
            for i, c in self._last_counts.items():
                load_counts[i] = load_counts.get(i, 0) + c
            if bar is not None:
                rate = window_tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
            if self.step % cfg.log_interval == 0 or self.step == end:
                self._log_window(window_loss, window_tokens, time.perf_counter() - t0, load_counts)
                window_loss, window_tokens, t0, load_counts = 0.0, 0, time.perf_counter(), {}
            if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                self._log_eval()
            if self.step % cfg.save_interval == 0 or self.step == end:
                self.save()
        if bar is not None:
            bar.close()
        return self.history

    def _log_window(self, loss_sum: float, tokens: int, seconds: float, counts: dict) -> None:
        n = tokens // (self.cfg.batch_size * self.cfg.seq_len)
        rec = {"step": self.step, "loss": loss_sum / max(n, 1), "tokens_per_s": tokens / max(seconds, 1e-9),
               "lr": lr_at(self.cfg, self.step - 1), "epoch": self.batches.epoch}
        self.history.train.append(rec)
        stats = balance.load_stats(counts)
        self.history.load.append({"step": self.step, "layers": stats})
        self.log(f"step {self.step}/{self.cfg.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                 f"{rec['tokens_per_s']:.0f} tok/s epoch {rec['epoch']}"
                 + (f" | expert load {balance.format_stats(stats)}" if stats else ""))
        self._append_log({"kind": "train", **rec, "expert_load": stats})

    def _log_eval(self) -> None:
        rec = self.evaluate()
        self.history.val.append(rec)
        mtp = (f" | MTP loss {rec['mtp_loss']:.4f}, argmax = main model's next-but-one {rec['mtp_agree']:.1%}"
               if "mtp_loss" in rec else "")
        self.log(f"step {self.step}: validation loss {rec['loss']:.4f} perplexity {rec['ppl']:.2f}{mtp}")
        self._append_log({"kind": "val", **rec})

    def _append_log(self, rec: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write the HF checkpoint (fp32) and the resume side files into the output folder."""
        out = self.out
        self._write_model(out, torch.float32)
        tensors = self._optimizer_tensors()
        tmp = out / (OPTIM_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / OPTIM_FILE)
        data = {**self.batches.state(), "hash": self.data_hash}
        state = {"step": self.step, "config": self.cfg.to_json(), "data": data,
                 "schedule": {"step": self.step, "lr": lr_at(self.cfg, self.step)},
                 "history": dataclasses.asdict(self.history)}
        tmp = out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, out / STATE_FILE)
        return out

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        for p, st in self.optimizer.state.items():
            for key, value in st.items():
                tensors[f"{names[id(p)]}.{key}"] = value.detach().to("cpu").contiguous()
        return tensors

    def _restore(self, state: dict) -> None:
        from ..hf.loader import load_state

        load_state(self.model, self.out)
        tensors = load_file(str(self.out / OPTIM_FILE))
        torch.set_rng_state(tensors.pop("rng.cpu"))
        cuda_rng = tensors.pop("rng.cuda", None)
        if cuda_rng is not None and torch.cuda.is_available() and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(cuda_rng)
        params = dict(self.model.named_parameters())
        for key, value in tensors.items():
            name, slot = key.rsplit(".", 1)
            p = params[name]
            dev = p.device if slot != "step" else value.device
            self.optimizer.state[p][slot] = value.to(dev)
        self.step = int(state["step"])
        self.batches.load_state(state["data"])
        h = state.get("history", {})
        self.history = History(train=h.get("train", []), val=h.get("val", []), load=h.get("load", []))
        self.log(f"resumed {self.out} at step {self.step} (epoch {self.batches.epoch}, batch {self.batches.index})")

    def export(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """A clean HF checkpoint (no side files), e.g. in bf16 for shipping."""
        return self._write_model(Path(folder), dtype)

    def _write_model(self, folder: Path, dtype: torch.dtype) -> Path:
        ids = special_ids(self.tok)
        save_hf(self.model, folder, dtype, **ids)
        save_tokenizer(self.tok, folder, self.model_cfg.max_position_embeddings)
        gen = {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], "do_sample": True,
               "temperature": 0.8, "top_p": 0.95}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        return folder


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

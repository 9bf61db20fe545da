"""The training loop: AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on CUDA,
DeepSeek-V3 load balancing, periodic validation, and checkpoints that resume exactly. Under torchrun the
same loop runs data-parallel (DDP, or FSDP2 with `fsdp`): see `distributed.py`.

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
from torch import nn

from ..hf.export import save_hf
from ..hf.families import parse_config
from ..hf.loader import build, load_state
from ..model.mtp import mtp_logits, share_embeddings
from ..model.transformer import Transformer
from . import balance
from .bpe import save_tokenizer, special_ids, train_bpe
from .data import Batches, Split, read_texts, split, stream_hash, text_lines, tokenize
from .distributed import data_parallel, local_rows
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


class Objective(nn.Module):
    """The training forward of a model as one module (what DDP and FSDP2 wrap): tokens [B, T+1] ->
    (logits [B, T, vocab] for t_1..t_T, the MTP depths' logits [B, T-k, vocab], k = 1, 2, ...)."""

    def __init__(self, model: Transformer, frozen_main: bool = False):
        super().__init__()
        self.model, self.frozen_main = model, frozen_main  # frozen_main: only the MTP layers learn

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_main):
            logits, hidden = self.model(tokens[:, :-1], return_hidden=True)
        return logits, mtp_logits(self.model, hidden, tokens)


def _silent(_msg: str) -> None:
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print, steps: int | None = None,
                 fsdp: bool = False):
        """With `resume`, the run saved in `cfg.out` continues with its saved settings (only the device
        and, when given, the total number of `steps` change). Under torchrun every rank builds a Trainer:
        DDP, or FSDP2 with `fsdp`; only rank 0 logs and writes (`distributed.py`)."""
        self.dp, device = data_parallel(cfg.device, fsdp)
        self.log = log if self.dp.is_main else _silent
        self.out = Path(cfg.out)
        state = self._read_state() if resume else None
        if state is not None:
            device = cfg.device
            cfg = TrainConfig.from_json(state["config"])
            cfg.device = device
        if steps is not None:
            cfg.steps = steps
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed)  # the same seed, so the same initialisation, on every rank
        self.tok = self._tokenizer(state)
        self._prepare_data(state)
        self.rows = local_rows(cfg.batch_size, self.dp)  # this rank's rows of each global batch
        raw = {**cfg.model, "vocab_size": self.tok.get_vocab_size(), **special_ids(self.tok)}
        self.model_cfg = parse_config(raw, "model config")
        self.model = build(self.model_cfg, torch.float32, self.device)
        share_embeddings(self.model)  # MTP layers read and write through the main embedding and head
        if cfg.train_only is not None:
            self._freeze(cfg.train_only)
        self.step = 0
        self._last_counts: dict[int, torch.Tensor] = {}
        self.history = History()
        if state is None:
            init_weights(self.model, std=float(raw.get("initializer_range", 0.02)))
            if cfg.init_from is not None:
                self._init_from(Path(cfg.init_from))
        else:
            load_state(self.model, self.out)  # the whole model on every rank, before FSDP2 shards it
        self.net = self.dp.wrap(Objective(self.model, frozen_main=cfg.train_only == "mtp"), self.model)
        self.optimizer = self._optimizer()
        if state is not None:
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
        text = None
        if self.dp.is_main:  # rank 0 trains it, the others get the same one
            text = train_bpe(text_lines(read_texts(self.cfg.texts)), self.cfg.vocab_size).to_str()
        return Tokenizer.from_str(self.dp.broadcast_object(text))

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
        """One optimizer step on one global batch; returns its mean loss (over every rank's rows)."""
        try:
            return self._train_step()
        except RuntimeError as e:
            err = self.dp.failure(e, self.step)
            if err is e:
                raise
            raise err from e

    def _train_step(self) -> float:
        cfg, model = self.cfg, self.model
        model.train()
        lr = lr_at(cfg, self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = self.batches.next()[self.rows].to(self.device)  # [batch_size / world, seq_len + 1]
        balance.set_recording(model, indices=True, scores=cfg.seq_aux_alpha > 0)
        mtp_only = cfg.train_only == "mtp"  # (the objective then runs the frozen main model without a graph)
        with _autocast(self.device):
            logits, depths = self.net(batch)
        loss = _ce(logits, batch[:, 1:])
        total = 0.0 if mtp_only else loss
        if depths:
            total = total + (1.0 if mtp_only else cfg.mtp_weight) * self._mtp_loss(depths, batch)
        if cfg.seq_aux_alpha > 0:
            total = total + cfg.seq_aux_alpha * balance.sequence_balance_loss(model, batch.shape[0])
        total.backward()  # DDP / FSDP2: the gradients are averaged over the ranks here
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss, counts = self._global_stats(loss, balance.expert_counts(model))
        if mtp_only:  # the frozen main model's router biases stay as they are
            counts = {i: c for i, c in counts.items() if i >= self.model_cfg.num_layers}
        balance.update_bias(model, counts, cfg.bias_update_rate)  # the same step on every rank
        balance.set_recording(model, indices=False, scores=False)
        self.step += 1
        self._last_counts = counts
        return mean_loss

    def _global_stats(self, loss: torch.Tensor, counts: dict[int, torch.Tensor]) -> tuple[float, dict]:
        """The global batch's mean loss and expert counts {layer: [E]}: this rank's summed with the other
        ranks' in one all-reduce (the ranks' shares are equal, so the mean of their means is the mean)."""
        layers = sorted(counts)
        flat = torch.cat([loss.detach().double().reshape(1).cpu(), *(counts[i] for i in layers)])
        self.dp.all_reduce(flat)
        parts = flat[1:].split([len(counts[i]) for i in layers])
        return float(flat[0]) / self.dp.world, dict(zip(layers, parts, strict=True))

    def _mtp_loss(self, depths: list[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's MTP objective: the mean over depths k of the cross-entropy of t_{i+k+1}."""
        losses = [_ce(lg, batch[:, k + 1 :]) for k, lg in enumerate(depths, start=1)]
        self._last_mtp = [float(x.detach()) for x in losses]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean cross-entropy (nats/token) and perplexity over every held-out chunk (under torchrun the
        batches of chunks are dealt round-robin to the ranks and the sums added)."""
        self.model.eval()
        val, bs, world = self.split.val, self.cfg.batch_size, self.dp.world
        if len(val) == 0:
            return {"step": self.step, "loss": float("nan"), "ppl": float("nan")}
        sums = torch.zeros(5, dtype=torch.float64)  # loss sum, tokens, MTP loss sum, MTP hits, MTP tokens
        rounds = -(-len(val) // (bs * world))
        for r in range(rounds):
            start = (r * world + self.dp.rank) * bs
            if start >= len(val) and not self.dp.fsdp:
                continue
            # FSDP2: every rank runs every forward (its all-gathers); one without chunks counts nothing
            chunk = val[start : start + bs] if start < len(val) else val[:1]
            sums += self._eval_sums(chunk.long().to(self.device)) * float(start < len(val))
        self.dp.all_reduce(sums)
        total, n, mtp_total, mtp_hits, mtp_n = sums.tolist()
        mean = total / n
        rec = {"step": self.step, "loss": mean, "ppl": math.exp(min(mean, 50.0))}
        if mtp_n:
            rec.update(mtp_loss=mtp_total / mtp_n, mtp_agree=mtp_hits / mtp_n)
        return rec

    def _eval_sums(self, chunk: torch.Tensor) -> torch.Tensor:
        """chunk [b, seq_len + 1] -> [loss sum, tokens, MTP loss sum, MTP hits, MTP tokens] (float64)."""
        with _autocast(self.device):
            logits, depths = self.net(chunk)
        out = torch.zeros(5, dtype=torch.float64)
        out[0] = float(_ce(logits, chunk[:, 1:], reduction="sum"))
        out[1] = chunk[:, 1:].numel()
        for lg in depths[:1]:  # the first MTP layer: its loss, and how often its argmax is the
            target = chunk[:, 2:]  # main model's own greedy choice (what greedy speculation accepts)
            out[2] = float(_ce(lg, target, reduction="sum"))
            out[3] = int((lg.argmax(-1) == logits[:, 1:].argmax(-1)).sum())
            out[4] = target.numel()
        return out

    # ------------------------------------------------------------------ loop
    def run(self, stop_at: int | None = None, progress: bool = True) -> History:
        """Train to `cfg.steps` (or stop, with a checkpoint, at `stop_at`); returns the history."""
        cfg = self.cfg
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        bar = _progress(self.step, cfg.steps, progress and self.dp.is_main)
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
        if not self.dp.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write the HF checkpoint (fp32) and the resume side files into the output folder (under torchrun:
        every rank takes part in gathering FSDP2's shards, rank 0 writes)."""
        out = self.out
        model = self._full_model()
        tensors = self._optimizer_tensors()
        if self.dp.is_main:
            self._write_files(model, tensors)
        self.dp.barrier()
        return out

    def _write_files(self, model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
        out = self.out
        self._write_model(model, out, torch.float32)
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

    def _full_model(self) -> Transformer | None:
        """The model with whole tensors: itself, or under FSDP2 a copy gathered from the shards (every rank
        takes part; the copy lives on rank 0, None elsewhere)."""
        if not self.dp.fsdp:
            return self.model
        plain = None
        if self.dp.is_main:
            plain = build(self.model_cfg, torch.float32, "cpu")
            share_embeddings(plain)
        dst = dict(plain.named_parameters()) if plain is not None else {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                full = self.dp.full(p.detach())
                if name in dst:
                    dst[name].copy_(full)
        return plain

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW's state per parameter (whole tensors) and the RNG states; under FSDP2 every rank gathers,
        rank 0 keeps them."""
        tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        for name, p in self.model.named_parameters():
            for key, value in self.optimizer.state.get(p, {}).items():
                full = self.dp.full(value.detach())
                if self.dp.is_main:
                    tensors[f"{name}.{key}"] = full.to("cpu").contiguous()
        return tensors

    def _restore(self, state: dict) -> None:
        """The optimizer, RNG, step and data position of the saved run (the weights are already loaded)."""
        tensors = load_file(str(self.out / OPTIM_FILE))
        torch.set_rng_state(tensors.pop("rng.cpu"))
        cuda_rng = tensors.pop("rng.cuda", None)
        if cuda_rng is not None and torch.cuda.is_available() and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(cuda_rng)
        params = dict(self.model.named_parameters())
        for key, value in tensors.items():
            name, slot = key.rsplit(".", 1)
            p = params[name]
            self.optimizer.state[p][slot] = value if slot == "step" else self.dp.shard_like(value, p)
        self.step = int(state["step"])
        self.batches.load_state(state["data"])
        h = state.get("history", {})
        self.history = History(train=h.get("train", []), val=h.get("val", []), load=h.get("load", []))
        self.log(f"resumed {self.out} at step {self.step} (epoch {self.batches.epoch}, batch {self.batches.index})")

    def export(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """A clean HF checkpoint (no side files), e.g. in bf16 for shipping (rank 0 writes it)."""
        model = self._full_model()
        if self.dp.is_main:
            self._write_model(model, Path(folder), dtype)
        self.dp.barrier()
        return Path(folder)

    def _write_model(self, model: Transformer, folder: Path, dtype: torch.dtype) -> Path:
        ids = special_ids(self.tok)
        save_hf(model, folder, dtype, **ids)
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

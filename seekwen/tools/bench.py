"""`seekwen bench`: inference speed on this machine, optionally against Hugging Face transformers.

Builds (once, cached under ~/.cache/seekwen/bench/) Hub-format checkpoints with random weights and
realistic shapes, or takes `--model`. For each model: prefill tokens/s and time to first token,
batch-1 decode at several prompt lengths, batched decode, a context sweep (decode speed with the
cache filled to 32..4096 tokens), peak RSS, KV-cache bytes per token (checked against the formula),
and how close decode gets to the read-bandwidth roofline (weight bytes read per step / step time)
and prefill to the measured matmul peak. `--vs-hf` runs transformers on the same checkpoint in the
same process, interleaved section by section, and prints the ratios. `--quantize int8` also prints
the perplexity change on held-out text.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from pathlib import Path

import torch

BENCH_MODELS = {
    # Qwen2.5-0.5B's shape (494M parameters, tied embeddings)
    "dense": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "float32",
    },
    # DeepSeek-V2-Lite's layer shapes, 6 layers and 1024 hidden (989M total, 257M active)
    "moe": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 1024, "intermediate_size": 5632, "moe_intermediate_size": 704, "num_hidden_layers": 6,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax",
        "routed_scaling_factor": 1.0, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 100000,
        "eos_token_id": 100001, "torch_dtype": "float32", "attention_bias": False,
    },
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference speed (prefill, decode, batch, context), optionally vs transformers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None, help="checkpoint to bench instead of the built-in shapes")
    p.add_argument("--models", default="dense,moe", help="built-in shapes to bench: dense, moe (default both)")
    p.add_argument("--sections", default="prefill,decode,batch,context",
                   help="comma list of prefill, decode, batch, context, ppl (default all but ppl)")
    p.add_argument("--prompt-lens", default="32,512", help="batch-1 decode prompt lengths")
    p.add_argument("--batch-sizes", default="8,32", help="batched decode sizes (prompt 32)")
    p.add_argument("--contexts", default="32,512,2048,4096", help="context sweep: cache lengths (seekwen only)")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=24, help="decode steps timed per measurement")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats per measurement (best kept)")
    p.add_argument("--vs-hf", action="store_true", help="also run transformers, same checkpoint, interleaved")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size")
    p.add_argument("--no-fast", action="store_true", help="run seekwen's plain reference path (no prepare)")
    p.add_argument("--ppl-model", default=None, help="model for the int8 perplexity check (default: bundled)")
    p.add_argument("--ppl-text", default=None, help="text file for the perplexity check (held-out chunks)")
    p.add_argument("--cache-dir", default="~/.cache/seekwen/bench", help="where built-in checkpoints are written")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both engines run there)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: eager decode steps instead of CUDA graphs")
    p.add_argument("--compile", action="store_true", help="CUDA: torch.compile the decode step before capturing it")
    p.set_defaults(func=run)


# ---- checkpoints ------------------------------------------------------------------------------------


def build_checkpoint(name: str, cache_dir: str | Path, seed: int = 0) -> Path:
    """A Hub-format checkpoint (config.json + model.safetensors, one tensor per expert) with random
    weights of one of BENCH_MODELS' shapes; written once, reused."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(cache_dir).expanduser() / name
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BENCH_MODELS[name], indent=2))
    hf_cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(hf_cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key == "lm_head.weight" and BENCH_MODELS[name]["tie_word_embeddings"]:
            continue
        if "norm" in key:
            state[key] = torch.ones(shape)
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    save_file(_per_expert(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused experts (gate_up_proj [E, 2I, D], down_proj [E, D, I]) -> Hub layout."""
    out = {}
    for key, t in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate.clone(), up.clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[key] = t
    return out


# ---- machine ----------------------------------------------------------------------------------------


def _median_time(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_machine(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float, str]:
    """(read bandwidth GB/s: sum over 1 GiB; matmul GFLOP/s in `dtype`: 2048^3 on CPU, 8192^3 on CUDA;
    a label saying so)."""
    x = torch.ones(256 * 1024 * 1024, device=device)

    def timed(fn):
        def run():
            fn()
            sync(device)
        return _median_time(run, 5)

    bw = x.numel() * 4 / timed(x.sum) / 1e9
    del x
    n = 2048 if torch.device(device).type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / timed(lambda: torch.mm(a, b)) / 1e9
    name = str(dtype).removeprefix("torch.")
    return bw, flops, f"read bandwidth {bw:.1f} GB/s (sum over 1 GiB), {name} matmul {flops:.0f} GFLOP/s ({n}^3)"


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return 0.0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# ---- what a decode step reads -----------------------------------------------------------------------


def decode_bytes(model) -> int:
    """Weight bytes one batch-1 decode step reads: everything but an untied embedding table (one row
    is read) and the routed experts not chosen (top_k of n_routed per MoE layer)."""
    cfg = model.cfg
    head = {id(p) for p in model.head.parameters()}
    total = 0
    for name, p in model.named_parameters():  # shared (tied) tensors once
        if name.startswith("embed.") and id(p) not in head:
            continue
        frac = cfg.moe.top_k / cfg.moe.n_routed_experts if ".experts." in name else 1.0
        total += int(p.numel() * p.element_size() * frac)
    return total


def _matmul_params_per_token(model) -> int:
    """Weights every prompt token is multiplied by: all active parameters except the embedding (a
    lookup) and the LM head (applied to the last token only)."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    n -= cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    if cfg.moe is not None:
        per_expert = 3 * cfg.hidden_size * cfg.moe.intermediate_size
        n -= sum(cfg.mlp_layers) * per_expert * (cfg.moe.n_routed_experts - cfg.moe.top_k)
    return n


def kv_formula(cfg, size: int = 4) -> int:
    """KV-cache bytes per token (`size` bytes per number): MLA (kv_lora_rank + qk_rope_head_dim) x layers x
    size; GQA 2 x kv_heads x head_dim x layers x size."""
    if cfg.mla is not None:
        return (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * cfg.num_layers * size
    return 2 * cfg.num_kv_heads * cfg.head_dim * cfg.num_layers * size


# ---- runners: the same measurements for seekwen and transformers ------------------------------------


class Ours:
    name = "seekwen"

    def __init__(self, model, graphs: bool = False, compile: bool = False):
        self.model = model
        # decode steps from CUDA graphs (optionally compiled first): one runner (and its graphs) per cache
        self.graphs, self.compile = graphs, compile
        self.caches: dict[tuple[int, int], object] = {}
        self.runners: dict[int, object] = {}  # id(cache) -> its GraphRunner

    def new_cache(self, B: int, T: int):
        if not self.graphs:
            return self.model.new_cache(B, T)
        if (B, T) not in self.caches:  # reused across repeats, so each shape is captured once
            from ..runtime.graphs import GraphRunner

            cache = self.caches[B, T] = self.model.new_cache(B, T)
            self.runners[id(cache)] = GraphRunner(self.model, cache, compile=self.compile)
        cache = self.caches[B, T]
        cache.reset()
        return cache

    def prefill(self, ids: torch.Tensor, extra: int):
        B, S = ids.shape
        cache = self.new_cache(B, S + extra)
        keep = torch.full((B,), S - 1, device=ids.device)
        logits = self.model(ids, cache=cache, keep=keep)[:, 0]
        cache.lens += S
        return logits.argmax(-1), cache

    def step(self, tok: torch.Tensor, cache):
        runner = self.runners.get(id(cache))
        if runner is not None:
            logits = runner.decode(tok, tok.shape[0])
        else:
            logits = self.model(tok[:, None], cache=cache)[:, 0]
        cache.lens += 1
        return logits.argmax(-1), cache


class HF:
    name = "transformers"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids: torch.Tensor, extra: int):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    def step(self, tok: torch.Tensor, cache):
        out = self.model(tok[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1), out.past_key_values


def time_prefill(r, ids: torch.Tensor) -> float:
    sync(ids.device)
    t = time.perf_counter()
    r.prefill(ids, 1)
    sync(ids.device)
    return time.perf_counter() - t


def time_decode(r, ids: torch.Tensor, steps: int) -> float:
    """Median seconds per decode step after a prefill of `ids` (each step's token is ready before the
    next starts: on CUDA, synchronised)."""
    tok, cache = r.prefill(ids, steps + 2)
    times = []
    for _ in range(steps):
        sync(ids.device)
        t = time.perf_counter()
        tok, cache = r.step(tok, cache)
        sync(ids.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(runners: list, fn, repeats: int) -> dict[str, float]:
    """Best (lowest) time of `fn(runner)` per runner, runners alternating."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        for r in runners:
            t = fn(r)
            best[r.name] = min(best.get(r.name, float("inf")), t)
    return best


# ---- report -----------------------------------------------------------------------------------------


def _ratio(res: dict[str, float], higher_better: bool = True) -> str:
    if "transformers" not in res or "seekwen" not in res:
        return ""
    a, b = res["seekwen"], res["transformers"]
    return f"  ({a / b if higher_better else b / a:.2f}x transformers)"


def _line(label: str, res: dict[str, float], unit: str, extra: str = "", higher_better: bool = True) -> None:
    vals = "   ".join(f"{k} {v:8.2f} {unit}" for k, v in res.items())
    # times (lower is better) are still reported as a speed ratio: transformers' time / seekwen's
    ratio = _ratio(res, higher_better).replace("x transformers", "x transformers' speed") if not higher_better \
        else _ratio(res)
    print(f"  {label:<36} {vals}{ratio}{extra}")


def mem_gb(device: torch.device) -> float:
    """Memory in use: the process's RSS on CPU, PyTorch's allocated GPU memory on CUDA."""
    return torch.cuda.memory_allocated() / 1e9 if device.type == "cuda" else rss_gb()


def bench_model(args, folder: Path, machine: tuple[float, float]) -> None:
    import seekwen

    from ..fast import prepare
    from ..runtime.graphs import graph_blocker

    bw, peak = machine
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    print(f"\n== {folder}")
    mem0 = mem_gb(device)
    model = seekwen.load(folder, dtype=dtype, device=device)
    if not args.no_fast:
        prepare(model, quantize=args.quantize, group_size=args.group_size)
    cfg = model.cfg
    blocker = graph_blocker(model)
    graphs = device.type == "cuda" and not args.no_graphs and blocker is None
    ours = Ours(model, graphs=graphs, compile=graphs and args.compile)
    runners = [ours]
    mem_ours = mem_gb(device) - mem0
    if args.vs_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        runners = [HF(hf), ours]
    n_params = _count_params(cfg)
    step_bytes = decode_bytes(model)
    hf_bytes = decode_bytes_plain(cfg) * size // 4
    kv = model.new_cache(1, 8).bytes_per_token()
    mode = "plain reference path" if args.no_fast else f"fast path, {args.quantize or args.dtype} weights"
    if device.type == "cuda":
        if graphs:
            mode += ", torch.compile + CUDA graphs" if args.compile else ", CUDA graphs"
        else:
            mode += f", eager decode ({'--no-graphs' if args.no_graphs else blocker})"
    print(f"  {cfg.model_type}: {n_params / 1e6:.0f}M parameters, seekwen {mode}, on {device}")
    what = "MLA (kv_lora_rank + qk_rope) x layers" if cfg.mla else "2 x kv_heads x head_dim x layers"
    print(f"  KV cache: {kv} bytes/token (formula {kv_formula(cfg, size)}: {what} x {size})"
          f"{'  OK' if kv == kv_formula(cfg, size) else '  MISMATCH'}")
    print(f"  weights read per batch-1 decode step: seekwen {step_bytes / 1e9:.3f} GB"
          f" -> roofline {bw * 1e9 / step_bytes:.1f} tok/s; {args.dtype} {hf_bytes / 1e9:.3f} GB"
          f" -> {bw * 1e9 / hf_bytes:.1f}")
    where = "GPU memory allocated" if device.type == "cuda" else "RSS"
    print(f"  {where} by seekwen's model after load{'' if args.no_fast else ' + prepare'}: {mem_ours:.2f} GB")
    sections = args.sections.split(",")
    g = torch.Generator().manual_seed(0)

    def prompt(B: int, S: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)

    with torch.inference_mode():
        if "prefill" in sections:
            ids = prompt(1, args.prefill_len)
            res = interleaved(runners, lambda r: time_prefill(r, ids), args.repeats)
            tps = {k: args.prefill_len / v for k, v in res.items()}
            flops = 2 * _matmul_params_per_token(model) * args.prefill_len
            pct = f"  [seekwen {flops / res['seekwen'] / 1e9 / peak:.0%} of matmul peak]"
            _line(f"prefill {args.prefill_len} tokens", tps, "tok/s", pct)
            ids = prompt(1, 32)
            res = interleaved(runners, lambda r: time_prefill(r, ids), args.repeats)
            _line("time to first token, 32-token prompt", {k: v * 1000 for k, v in res.items()}, "ms",
                  higher_better=False)
        if "decode" in sections:
            for S in _ints(args.prompt_lens):
                ids = prompt(1, S)
                res = interleaved(runners, lambda r, ids=ids: time_decode(r, ids, args.decode_tokens), args.repeats)
                tps = {k: 1 / v for k, v in res.items()}
                roof = f"  [roofline: seekwen {step_bytes / res['seekwen'] / 1e9 / bw:.0%}"
                if "transformers" in res:
                    roof += f", transformers {hf_bytes / res['transformers'] / 1e9 / bw:.0%}"
                _line(f"decode batch 1, {S}-token prompt", tps, "tok/s", roof + "]")
        if "batch" in sections:
            for B in _ints(args.batch_sizes):
                ids = prompt(B, 32)
                res = interleaved(runners, lambda r, ids=ids: time_decode(r, ids, args.decode_tokens), args.repeats)
                _line(f"decode batch {B}, 32-token prompts", {k: B / v for k, v in res.items()}, "tok/s")
        if "context" in sections:
            print("  decode batch 1 vs context (seekwen; cache filled to the length, not prefilled):")
            for T in _ints(args.contexts):
                if T + args.decode_tokens + 1 > cfg.max_position_embeddings:
                    continue
                cache = ours.new_cache(1, T + args.decode_tokens + 2)
                tok = torch.zeros(1, dtype=torch.long, device=device)

                def step(tok=tok, cache=cache, T=T):
                    cache.lens.fill_(T)  # the same slot each time: the step's cost at context T
                    ours.step(tok, cache)
                    sync(device)

                t = _median_time(step, args.decode_tokens)
                print(f"    context {T:>5}: {1 / t:7.2f} tok/s")
    if device.type == "cuda":
        print(f"  peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    print(f"  peak RSS of the process: {peak_rss_gb():.2f} GB")


def _count_params(cfg) -> int:
    from ..loader import build

    return sum(p.numel() for p in build(cfg, device="meta").parameters())


def decode_bytes_plain(cfg) -> int:
    """fp32 weight bytes a batch-1 decode step reads in the unquantized model."""
    from ..loader import build

    return decode_bytes(build(cfg, device="meta"))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


# ---- perplexity -------------------------------------------------------------------------------------


def perplexity(model, chunks: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over chunks [N, L]."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in chunks:
            logits = model(row[None, :-1])[0].float()
            total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return float(torch.exp(torch.tensor(total / count)))


def held_out_chunks(model, text_path: str, seq_len: int = 256, val_every: int = 50, n: int = 16) -> torch.Tensor:
    """The trainer's held-out chunks (every `val_every`-th chunk of seq_len + 1 tokens)."""
    text = Path(text_path).read_text()
    ids = torch.tensor(model.tokenizer.encode(text, add_special_tokens=False))
    n_chunks = ids.numel() // (seq_len + 1)
    chunks = ids[: n_chunks * (seq_len + 1)].view(n_chunks, seq_len + 1)
    return chunks[(val_every // 2) % n_chunks :: val_every][:n]


def ppl_check(args) -> None:
    import seekwen

    from ..fast import prepare
    from .common import model_path

    path = model_path(args.ppl_model)
    text = args.ppl_text or "runs/kjv.txt"
    if not Path(path).exists() or not Path(text).exists():
        print(f"\n== perplexity: skipped ({path if not Path(path).exists() else text} not found)")
        return
    base = seekwen.load(path, dtype=torch.float32)
    seq = min(256, base.cfg.max_position_embeddings)
    chunks = held_out_chunks(base, text, seq_len=seq)
    q = prepare(copy.deepcopy(base), quantize=args.quantize or "int8", group_size=args.group_size)
    p0, p1 = perplexity(base, chunks), perplexity(q, chunks)
    print(f"\n== perplexity on {chunks.shape[0]} held-out chunks of {chunks.shape[1] - 1} tokens from {text} ({path})")
    print(f"  fp32 {p0:.4f}   {args.quantize or 'int8'} {p1:.4f}   change {100 * (p1 / p0 - 1):+.3f}%")


def run(args) -> int:
    from ..errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    import platform

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this torch build")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    bw, peak, probe = measure_machine(args.device, getattr(torch, args.dtype))
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"machine: {where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"  {probe}")
    sections = args.sections.split(",")
    if args.model:
        from ..loader import resolve
        from .common import model_path

        folders = [resolve(model_path(args.model))]
    else:
        folders = [build_checkpoint(name, args.cache_dir) for name in args.models.split(",") if name]
    if sections != ["ppl"]:
        for folder in folders:
            bench_model(args, folder, (bw, peak))
    if args.quantize or "ppl" in sections:
        ppl_check(args)
    return 0

"""Load a GGUF file (llama.cpp / ollama) into the same `Transformer` a Hugging Face checkpoint gives.

    model = seekwen.load("qwen2.5-0.5b-instruct-q8_0.gguf")     # or a folder holding one .gguf

1. metadata -> HF config dict -> `ModelConfig` (`config.py`), so every family rule is the HF parser's;
2. `hf.loader.build` allocates the model; each GGUF tensor is mapped onto our parameter names
   (`names.py`), the converter's splits and fusions undone, shapes checked;
3. F32/F16/BF16 tensors are copied as they are; a Q8_0 / Q4_0 weight of a linear layer becomes a layer
   built from its blocks (`quant.linear_from_blocks`), any other quantized tensor (K-quants, quantized
   embeddings and stacked experts) is dequantized to the model's dtype;
4. the tokenizer: HF files beside the GGUF, else rebuilt from the metadata (`tokenizer.py`); then the
   fast path, as for any checkpoint.
Every error names the file and the tensor or key (`GGUFError`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..hf.families import parse_config
from ..hf.loader import build, parse_dtype
from ..model.moe import Experts
from ..model.transformer import Transformer
from .config import model_config
from .names import IGNORED, PERMUTED_QK, composites, gguf_name, our_name, qk_heads, unpermute_qk
from .quant import BLOCKS, check_type, dequantize_blocks, linear_from_blocks, to_torch
from .reader import GGUFError, GGUFFile
from .tokenizer import gguf_tokenizer

_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def is_gguf(path: str | os.PathLike) -> bool:
    """A `.gguf` path (existing or not: a missing one gets GGUF's error), or a folder without config.json
    holding at least one `.gguf` file."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        return True
    return p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))


def gguf_file(path: str | os.PathLike) -> Path:
    """The one GGUF file `path` names (itself, or the only .gguf in a folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) != 1:
            names = ", ".join(f.name for f in files) or "none"
            raise GGUFError(f"{p}: expected one .gguf file in the folder, found {len(files)} ({names}); "
                            "pass the file itself")
        p = files[0]
    if not p.is_file():
        raise GGUFError(f"{p}: no such GGUF file")
    if _SPLIT.search(p.name):
        raise GGUFError(f"{p}: split GGUF files are not supported; merge them first "
                        "(llama-gguf-split --merge FIRST-PART OUT.gguf)")
    return p


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config_overrides: dict | None = None,
    quantize: str | None = None,
    fast: bool = True,
) -> Transformer:
    """`seekwen.load` of a GGUF file; the arguments mean what they mean for a HF checkpoint. dtype: default
    the file's (F16 -> float16, BF16 -> bfloat16, F32 and quantized files -> float32)."""
    f = GGUFFile(gguf_file(path))
    cfg = read_config(f, config_overrides)
    model = build(cfg, parse_dtype(dtype), device)
    lean = fast and quantize is None  # the fast path runs the file's blocks / 16-bit weights as stored
    load_tensors(model, f, lean=lean)
    model.eval()
    model.path = f.path
    model.gguf_types = tensor_types(f)
    model.tokenizer = gguf_tokenizer(f)
    if fast or quantize:
        from ..fast import prepare

        prepare(model, quantize=quantize)
    if lean:
        materialize_unloaded(model)
    return model


def read_config(f: GGUFFile, config_overrides: dict | None = None) -> ModelConfig:
    """The file's ModelConfig (overrides applied as HF config.json fields), llama.cpp's end-of-generation
    tokens (eos, eot, eom) as its EOS ids."""
    raw, cfg = model_config(f)
    if config_overrides:
        try:
            cfg = parse_config({**raw, **config_overrides}, f"{f.path} (GGUF metadata, with overrides)")
        except ConfigError as e:
            raise GGUFError(str(e)) from e
    ids = cfg.eos_ids
    for key in ("eot", "eom"):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and i not in ids:
            ids.append(int(i))
    cfg.eos_token_id = ids or None
    return cfg


def tensor_types(f: GGUFFile) -> dict[str, int]:
    """How many tensors of each ggml type the file holds, e.g. {"Q4_K": 97, "Q6_K": 13, "F32": 121}."""
    out: dict[str, int] = {}
    for t in f.tensors.values():
        out[t.type] = out.get(t.type, 0) + 1
    return out


@torch.no_grad()
def load_tensors(model: Transformer, f: GGUFFile, lean: bool = False) -> None:
    """Fill every parameter of `model` from the file; error on anything missing, unexpected or misshapen.

    lean (the fast path will run, weights as stored): a weight the fast path takes from the file's form
    (a linear layer's or the stacked experts' Q8_0 / Q4_0 blocks, F16 / BF16 weights of an fp32 model) is
    not also dequantized into its reference parameter: the parameter stays an untouched allocation (no
    memory pages), the module is marked `weight_unloaded` (experts: `unloaded`, the names), and
    `fast.linear.weight_of` dequantizes from the blocks wherever a reference weight is still read. A
    Q4_0 DeepSeek-V2-Lite-shaped file then loads in about its own size instead of its fp32 size."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled, consumed = _load_composites(model, f, params)
    blocks: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}  # param -> (kind, q, d)
    unexpected = []
    for name in f.tensors:
        if name in consumed or IGNORED.match(name):
            continue
        param = our_name(name)
        if param is None or param not in params:
            unexpected.append(name)
            continue
        _load_one(model, f, name, param, params, blocks, lean)
        filled.add(param)
    if unexpected:
        raise GGUFError(f"{f.path}: unexpected tensor(s) for {model.cfg.model_type}: {_more(unexpected)}")
    tied = model.cfg.tie_word_embeddings
    missing = [f"{gguf_name(p)} (for {p})" for p in params if p not in filled and not (tied and p == "head.weight")]
    if missing:
        raise GGUFError(f"{f.path}: missing tensor(s): {_more(missing)}")
    for param, (kind, q, d) in blocks.items():
        _swap_linear(model, param, kind, q, d, lean)
    embd = f.tensors.get("token_embd.weight")
    if tied and embd is not None and embd.type in BLOCKS:  # the tied head runs from the file's blocks
        q, d = BLOCKS[embd.type](embd.data)  # (on the fast path; the lookup reads the dequantized rows)
        model.head.gguf_blocks = (embd.type, q, d)
    elif tied and embd is not None:
        keep_half(model.head, embd.type, to_torch(embd, str(f.path)), model.head.weight)


def _load_composites(model: Transformer, f: GGUFFile, params: dict) -> tuple[set[str], set[str]]:
    """The parameters built from the converter's split / fused tensors: (params filled, tensors used)."""
    filled, consumed = set(), set()
    for comp in composites(model.cfg, set(f.tensors)):
        missing = [s for s in comp.sources if s not in f.tensors]
        if missing:
            raise GGUFError(f"{f.path}: missing tensor(s) {', '.join(missing)} (the other half of "
                            f"{', '.join(s for s in comp.sources if s in f.tensors)})")
        try:
            outs = comp.build([to_torch(f.tensors[s], str(f.path)) for s in comp.sources])
        except (ValueError, RuntimeError) as e:
            raise GGUFError(f"{f.path}: {' + '.join(comp.sources)}: {e}") from e
        for param, t in zip(comp.params, outs, strict=True):
            _copy(f, params, param, t, " + ".join(comp.sources))
            filled.add(param)
        consumed.update(comp.sources)
        keep_mla_head_blocks(model, f, comp.sources, comp.params)
    return filled, consumed


def keep_mla_head_blocks(model: Transformer, f: GGUFFile, sources: tuple[str, ...], params: tuple[str, ...]) -> None:
    """MLA's attn_k_b [H, r, nope] and attn_v_b [H, v, r] stored as Q8_0 / Q4_0 blocks: besides the joined
    kv_b parameter (dequantized), its layer keeps them per head as `gguf_heads` = {"k_b": (kind, q [H, r,
    nope], d), "v_b": (kind, q [H, v, r], d)}: the absorbed decode's W_UK^T / W_UV^T per head as stored."""
    if len(sources) != 2 or not sources[0].endswith("attn_k_b.weight") or len(params) != 1:
        return
    heads = {}
    for key, name in zip(("k_b", "v_b"), sources, strict=True):
        t = f.tensors[name]
        if t.type not in BLOCKS or len(t.shape) != 3:
            return
        q, d = BLOCKS[t.type](t.data)  # [H * N, K], [H * N, K // 32]
        H = t.shape[0]
        heads[key] = (t.type, q.view(H, -1, q.shape[-1]), d.view(H, -1, d.shape[-1]))
    model.get_submodule(params[0].removesuffix(".weight")).gguf_heads = heads


def _load_one(model: Transformer, f: GGUFFile, name: str, param: str, params: dict, blocks: dict,
              lean: bool = False) -> None:
    """GGUF tensor `name` into `param`: a linear layer's Q8_0/Q4_0 weight kept as blocks (in `blocks`, the
    layer swapped once all is read), anything else copied (dequantized) into the parameter (lean: not
    where the module keeps the file's form, see `load_tensors`)."""
    t = f.tensors[name]
    check_type(t, str(f.path))
    heads = qk_heads(model.cfg, name) if f.arch in PERMUTED_QK else None
    if t.type in BLOCKS and _linear_of(model, param) is not None:
        q, d = BLOCKS[t.type](t.data)  # q [N, K], d [N, K // 32]
        _check_shape(f, name, tuple(q.shape), params[param], param)
        if heads:  # whole rows of blocks move: the blocks stay exact
            q, d = unpermute_qk(q, heads), unpermute_qk(d, heads)
        blocks[param] = (t.type, q, d)
        return
    # an experts tensor's blocks are decoded once, for its dequantized parameter and the blocks it keeps
    experts = _experts_of(model, param)
    decoded = BLOCKS[t.type](t.data) if t.type in BLOCKS and experts is not None else None
    if decoded is None:
        w = to_torch(t, str(f.path))
    else:
        w = dequantize_blocks(*decoded).reshape(t.shape) if not lean else torch.empty(t.shape, device="meta")
    if heads and tuple(w.shape) == tuple(params[param].shape):
        w = unpermute_qk(w, heads)
    linear = _linear_of(model, param)
    half = keep_half(linear, t.type, w, params[param])
    kept = keep_expert_blocks(model, param, t, w, decoded)
    if lean and (half or kept):  # the module runs the file's form: the fp32 copy would never be read
        _check_shape(f, name, tuple(w.shape), params[param], param)
        if half:
            linear.weight_unloaded = True
        else:
            experts.unloaded = {*getattr(experts, "unloaded", ()), param.rpartition(".")[2]}
        return
    _copy(f, params, param, w, name)


def _experts_of(model: nn.Module, param: str) -> Experts | None:
    """The stacked routed experts whose w1 / w2 / w3 `param` is, if it is one."""
    path, _, leaf = param.rpartition(".")
    module = model.get_submodule(path) if leaf in ("w1", "w2", "w3") else None
    return module if isinstance(module, Experts) else None


def keep_expert_blocks(model: nn.Module, param: str, t, w: torch.Tensor,
                       decoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
    """Stacked routed experts (`ffn.experts.w1` / `w3` / `w2` [E, N, K]) stored as Q8_0 / Q4_0 blocks, or
    as F16 / BF16 in an fp32 model: the Experts module also keeps them as the file has them,
    `gguf_blocks[w*] = (kind, q [E, N, K], d [E, N, K // 32] or None)`, so the fast path's experts run as
    stored (like a linear layer's `gguf_blocks`); the parameter holds the dequantized values for the rest.
    `decoded`: the tensor's blocks (q, d) where the caller has decoded them already. Returns whether it kept
    them."""
    experts = _experts_of(model, param)
    if experts is None:
        return False
    leaf = param.rpartition(".")[2]
    E = w.shape[0]
    if t.type in BLOCKS:
        q, d = BLOCKS[t.type](t.data) if decoded is None else decoded  # [E * N, K], [E * N, K // 32]
        blocks = (t.type, q.view(E, -1, q.shape[-1]), d.view(E, -1, d.shape[-1]))
    elif t.type in ("F16", "BF16") and model.get_parameter(param).dtype == torch.float32:
        blocks = (t.type, w.contiguous(), None)
    else:
        return False
    experts.gguf_blocks = {**getattr(experts, "gguf_blocks", {}), leaf: blocks}
    return True


def materialize_unloaded(model: nn.Module) -> None:
    """After `prepare` on a lean load: a reference module the fast path did not replace (none today, but
    a sibling class may keep one) gets its weight dequantized from the file's form, so no module of the
    model computes from an unfilled parameter."""
    from ..fast.linear import weight_of

    for module in model.modules():
        if getattr(module, "weight_unloaded", False):
            module.weight = nn.Parameter(weight_of(module), requires_grad=False)
            module.weight_unloaded = False
        for leaf in getattr(module, "unloaded", ()):
            kind, q, d = module.gguf_blocks[leaf]
            w = dequantize_blocks(q.flatten(0, 1), d.flatten(0, 1)).view(q.shape) if d is not None else q.float()
            setattr(module, leaf, nn.Parameter(w, requires_grad=False))
        if getattr(module, "unloaded", None):
            module.unloaded = set()


def keep_half(layer: nn.Linear | None, kind: str, w: torch.Tensor, param: torch.Tensor) -> bool:
    """A linear layer's F16 / BF16 weight loaded into an fp32 model: the layer also keeps the file's
    16-bit weight as `gguf_blocks` = (kind, w, None), so the fast path runs it as it is stored (16-bit
    weights, fp32 activations: half the bytes of fp32, the same values) instead of its fp32 copy."""
    if layer is not None and kind in ("F16", "BF16") and param.dtype == torch.float32:
        layer.gguf_blocks = (kind, w.contiguous(), None)
        return True
    return False


def _linear_of(model: nn.Module, param: str) -> nn.Linear | None:
    """The nn.Linear whose weight `param` is, if it is one."""
    if not param.endswith(".weight"):
        return None
    module = model.get_submodule(param.removesuffix(".weight"))
    return module if isinstance(module, nn.Linear) else None


def _swap_linear(model: Transformer, param: str, kind: str, q: torch.Tensor, d: torch.Tensor,
                 lean: bool = False) -> None:
    """Replace the linear layer owning `param` by the one built from its blocks (same bias, device); lean:
    its weight not dequantized (`weight_unloaded`)."""
    path = param.removesuffix(".weight")
    old = model.get_submodule(path)
    layer = linear_from_blocks(kind, q, d, None if old.bias is None else old.bias.detach(), dequantize=not lean)
    if isinstance(layer, nn.Linear) and old.weight.dtype != torch.float32:
        layer = layer.to(old.weight.dtype)  # the plain stand-in computes in the model's dtype
    layer = layer.to(old.weight.device)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def _check_shape(f: GGUFFile, name: str, shape: tuple[int, ...], p: torch.Tensor, param: str) -> None:
    if shape != tuple(p.shape):
        raise GGUFError(f"{f.path}: tensor '{name}' has shape {shape}, expected {tuple(p.shape)} "
                        f"(for {param}) from the GGUF metadata")


def _copy(f: GGUFFile, params: dict[str, torch.Tensor], param: str, t: torch.Tensor, name: str) -> None:
    p = params[param]
    if tuple(t.shape) != tuple(p.shape) and t.numel() == p.numel() and t.squeeze().shape == p.squeeze().shape:
        t = t.reshape(p.shape)  # [1, dim] vs [dim]: Qwen2-MoE's shared-expert gate
    _check_shape(f, name, tuple(t.shape), p, param)
    p.data.copy_(t)


def _more(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

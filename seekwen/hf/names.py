"""Hugging Face tensor names <-> our parameter names: rule groups, and the one two-way map built from them.

A `Rule` names one checkpoint tensor with a template (`{i}` layer, `{e}` expert, `{w}` weight|bias, which
also covers the optional biases: Qwen2's q/k/v bias, `attention_bias`) and the parameter(s) of ours it
fills, and says how tensor parallelism splits that parameter across ranks. Rules come in shared groups
(the llama-like skeleton, GQA attention, qk-norm, MLA, dense MLP, router, routed experts, the two kinds
of shared experts, Qwen v1's names); each family's list is composed from the groups its checkpoints
use (`families.py`), so a reverse lookup never has to filter by family.

`NameMap(model_type, rules, cfg)` (get one with `families.name_map(cfg)`) is the one map, both ways:

    hf_name("layers.0.attn.wq.weight")          -> "model.layers.0.self_attn.q_proj.weight"
    hf_name("layers.1.ffn.experts.w2", expert=3) -> "model.layers.1.mlp.experts.3.down_proj.weight"
    our_name("model.layers.1.mlp.experts.3.down_proj.weight") -> (Placement("layers.1.ffn.experts.w2", expert=3),)
    hf_module("layers.3.attn.wkv_a")             -> "model.layers.3.self_attn.kv_a_proj_with_mqa"
    split_dim("layers.0.attn.wo.weight")         -> 1

Loading (`loader.load_state`), export (`export.to_hf_state_dict`), `seekwen trace` and the loader's
missing/unexpected-weight messages all go through it.

Our parameter names follow DeepSeek-V3's reference `inference/model.py`: `embed`, `layers.{i}.attn_norm`,
`attn.{wq,wk,wv,wo}` (MLA: `wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b`), `ffn_norm`, `ffn.{w1,w2,w3}`
(gate, down, up), `ffn.gate`, `ffn.experts.{w1,w2,w3}` (stacked over experts), `ffn.shared`, `norm`, `head`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import ConfigError, ModelConfig

# How a parameter is split across tensor-parallel ranks, as in DeepSeek-V3's `inference/model.py`:
# "col" (ColumnParallelLinear, ParallelEmbedding): output rows, dim 0 of our [out, in] weight and of its
# bias; "row" (RowParallelLinear): input columns, dim 1 of the weight (its bias is added once, after the
# all-reduce, so it is replicated); "expert": each rank owns whole routed experts, dim 0 of our stacked
# [E, ...] parameter. None: replicated (norms, routers, MLA's low-rank down-projections).
Split = Literal["col", "row", "expert"]


@dataclass(frozen=True)
class Rule:
    """One checkpoint tensor (`hf`, a template) and the parameter(s) of ours it fills (`ours`).

    Several targets: the tensor is cut into equal chunks along `dim` (Qwen v1's fused `c_attn`), named
    `parts` for display. An `{e}` in `hf` selects row e of a stacked expert parameter. `split` says how
    tensor parallelism splits our parameter. `write=False` marks a layout we read but never write (the
    fused 3D experts transformers 5 may save); every parameter has exactly one written rule per family."""

    hf: str
    ours: tuple[str, ...]
    dim: int = 0
    split: Split | None = None
    parts: tuple[str, ...] = ()
    write: bool = True

    def split_dim(self, leaf: str) -> int | None:
        """The dimension of our parameter (ending in `leaf`) that is split across ranks; None: replicated."""
        if self.split == "row":
            return 1 if leaf == "weight" else None
        return None if self.split is None else 0


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor (or one chunk of it) goes: our parameter `param`, row `expert` of it
    when it is stacked over experts (None: the whole parameter), and which of `parts` equal chunks along
    `dim` of the checkpoint tensor it is."""

    param: str
    expert: int | None = None
    part: int = 0
    parts: int = 1
    dim: int = 0

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This placement's piece of the checkpoint tensor `t`."""
        return t if self.parts == 1 else t.chunk(self.parts, dim=self.dim)[self.part]


def _r(hf: str, *ours: str, split: Split | None = None, **kw) -> Rule:
    return Rule(hf, tuple(ours), split=split, **kw)


# ----------------------------------------------------------------------------------------------------
# rule groups: a family's list is a sum of these (families.py)

_L = "model.layers.{i}."
_O = "layers.{i}."

# the llama-like skeleton every Qwen2/3 and DeepSeek checkpoint shares: embedding, final norm, head,
# and the two norms of each layer
LLAMA_SKELETON = (
    _r("model.embed_tokens.weight", "embed.weight", split="col"),  # vocab rows (DeepSeek's ParallelEmbedding)
    _r("model.norm.weight", "norm.weight"),
    _r("lm_head.weight", "head.weight", split="col"),
    _r(_L + "input_layernorm.weight", _O + "attn_norm.weight"),
    _r(_L + "post_attention_layernorm.weight", _O + "ffn_norm.weight"),
)

# MHA/GQA with optional biases
GQA_ATTENTION = (
    _r(_L + "self_attn.q_proj.{w}", _O + "attn.wq.{w}", split="col"),
    _r(_L + "self_attn.k_proj.{w}", _O + "attn.wk.{w}", split="col"),
    _r(_L + "self_attn.v_proj.{w}", _O + "attn.wv.{w}", split="col"),
    _r(_L + "self_attn.o_proj.{w}", _O + "attn.wo.{w}", split="row"),
)

# Qwen3's per-head RMSNorm of q and k
QK_NORM = (
    _r(_L + "self_attn.q_norm.weight", _O + "attn.q_norm.weight"),
    _r(_L + "self_attn.k_norm.weight", _O + "attn.k_norm.weight"),
)

# Multi-head Latent Attention (DeepSeek-V2/V3): q straight (`q_proj`, V2-Lite) or through a low-rank
# latent (`q_a_proj` -> norm -> `q_b_proj`); the compressed KV latent and its up-projection
MLA = (
    _r(_L + "self_attn.q_proj.{w}", _O + "attn.wq.{w}", split="col"),
    _r(_L + "self_attn.q_a_proj.{w}", _O + "attn.wq_a.{w}"),
    _r(_L + "self_attn.q_a_layernorm.weight", _O + "attn.q_norm.weight"),
    _r(_L + "self_attn.q_b_proj.weight", _O + "attn.wq_b.weight", split="col"),
    _r(_L + "self_attn.kv_a_proj_with_mqa.{w}", _O + "attn.wkv_a.{w}"),
    _r(_L + "self_attn.kv_a_layernorm.weight", _O + "attn.kv_norm.weight"),
    _r(_L + "self_attn.kv_b_proj.weight", _O + "attn.wkv_b.weight", split="col"),
    _r(_L + "self_attn.o_proj.{w}", _O + "attn.wo.{w}", split="row"),
)

# dense SwiGLU MLP: down(silu(gate(x)) * up(x))
DENSE_MLP = (
    _r(_L + "mlp.gate_proj.weight", _O + "ffn.w1.weight", split="col"),
    _r(_L + "mlp.up_proj.weight", _O + "ffn.w3.weight", split="col"),
    _r(_L + "mlp.down_proj.weight", _O + "ffn.w2.weight", split="row"),
)

ROUTER = (_r(_L + "mlp.gate.weight", _O + "ffn.gate.weight"),)

# DeepSeek-V3's auxiliary-loss-free balancing bias (noaux_tc)
ROUTER_CORRECTION_BIAS = (_r(_L + "mlp.gate.e_score_correction_bias", _O + "ffn.gate.bias"),)

# routed experts, stacked [E, ...] on our side: one tensor per expert as on the Hub (written), or the
# fused 3D tensors transformers 5 may save (read only)
ROUTED_EXPERTS = (
    _r(_L + "mlp.experts.{e}.gate_proj.weight", _O + "ffn.experts.w1", split="expert"),
    _r(_L + "mlp.experts.{e}.up_proj.weight", _O + "ffn.experts.w3", split="expert"),
    _r(_L + "mlp.experts.{e}.down_proj.weight", _O + "ffn.experts.w2", split="expert"),
    Rule(_L + "mlp.experts.gate_up_proj", (_O + "ffn.experts.w1", _O + "ffn.experts.w3"), dim=1, split="expert",
         parts=("gate", "up"), write=False),
    _r(_L + "mlp.experts.down_proj", _O + "ffn.experts.w2", split="expert", write=False),
)

# DeepSeek's always-on shared experts (one MLP n_shared * moe_intermediate wide)
DEEPSEEK_SHARED_EXPERTS = (
    _r(_L + "mlp.shared_experts.gate_proj.weight", _O + "ffn.shared.w1.weight", split="col"),
    _r(_L + "mlp.shared_experts.up_proj.weight", _O + "ffn.shared.w3.weight", split="col"),
    _r(_L + "mlp.shared_experts.down_proj.weight", _O + "ffn.shared.w2.weight", split="row"),
)

# Qwen2-MoE's shared expert and the sigmoid gate in front of it
QWEN_SHARED_EXPERT = (
    _r(_L + "mlp.shared_expert.gate_proj.weight", _O + "ffn.shared.w1.weight", split="col"),
    _r(_L + "mlp.shared_expert.up_proj.weight", _O + "ffn.shared.w3.weight", split="col"),
    _r(_L + "mlp.shared_expert.down_proj.weight", _O + "ffn.shared.w2.weight", split="row"),
    _r(_L + "mlp.shared_expert_gate.weight", _O + "ffn.shared_gate.weight"),
)

# Qwen (v1), `QWenLMHeadModel`: fused q/k/v in `c_attn`, and an MLP written c_proj(w1(x) * silu(w2(x)))
_H = "transformer.h.{i}."
QWEN_V1 = (
    _r("transformer.wte.weight", "embed.weight", split="col"),
    _r("transformer.ln_f.weight", "norm.weight"),
    _r("lm_head.weight", "head.weight", split="col"),
    _r(_H + "ln_1.weight", _O + "attn_norm.weight"),
    _r(_H + "ln_2.weight", _O + "ffn_norm.weight"),
    _r(_H + "attn.c_attn.{w}", _O + "attn.wq.{w}", _O + "attn.wk.{w}", _O + "attn.wv.{w}", split="col",
       parts=("q", "k", "v")),
    _r(_H + "attn.c_proj.{w}", _O + "attn.wo.{w}", split="row"),
    _r(_H + "mlp.w2.weight", _O + "ffn.w1.weight", split="col"),
    _r(_H + "mlp.w1.weight", _O + "ffn.w3.weight", split="col"),
    _r(_H + "mlp.c_proj.weight", _O + "ffn.w2.weight", split="row"),
)

# DeepSeek-V3/R1's multi-token-prediction layer k is stored as decoder layer L + k (L = num_hidden_layers):
# its decoder block under the ordinary layer names (ours: `mtp.{k}.block.*`, named as layer 0's), plus
# these tensors of its own (ours: `mtp.{k}.*`, model/mtp.py)
MTP_OWN = {
    "embed_tokens.weight": "embed.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "norm.weight",
    "shared_head.head.weight": "head.weight",
}
_MTP_OWN_REVERSE = {ours: hf for hf, ours in MTP_OWN.items()}
_MTP_OWN_SPLIT = {"embed.weight": 0, "head.weight": 0}  # vocab rows, as the main embedding and head
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")

# checkpoint tensors that carry no weights we need: rotary caches, fp8 scales (read with their weight),
# another layout's multi-token-prediction module
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|_scale_inv$|^model\.mtp\.)")


# ----------------------------------------------------------------------------------------------------
# templates


def template_regex(template: str) -> re.Pattern:
    """A name template as a regex: {i} layer and {e} expert match digits, {w} matches weight|bias."""
    rx = re.escape(template)
    for key, sub in (("i", r"\d+"), ("e", r"\d+"), ("w", "weight|bias")):
        rx = rx.replace(re.escape("{" + key + "}"), f"(?P<{key}>{sub})")
    return re.compile(rx + "$")


_FIELDS = {"{i}": str.isdigit, "{e}": str.isdigit, "{w}": lambda s: s in ("weight", "bias")}


def _match_segments(template: list[str], segments: list[str]) -> dict[str, str] | None:
    """Segment-wise match of a dotted name against the leading segments of a template; the fields bound."""
    fields = {}
    for t, s in zip(template, segments, strict=False):
        if t in _FIELDS:
            if not _FIELDS[t](s):
                return None
            fields[t[1:-1]] = s
        elif t != s:
            return None
    return fields


def _fill(template: str, fields: dict[str, str]) -> str:
    """Substitute the bound fields; unbound ones ({e} for a whole expert stack) stay as written."""
    for key, value in fields.items():
        template = template.replace("{" + key + "}", value)
    return template


def _common_prefix(paths: list[list[str]]) -> list[str]:
    out = []
    for segs in zip(*paths, strict=False):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    return out


# ----------------------------------------------------------------------------------------------------
# the map


class NameMap:
    """The two-way name map of one family's checkpoints for one config (see the module docstring)."""

    def __init__(self, model_type: str, rules: tuple[Rule, ...], cfg: ModelConfig):
        self.model_type = model_type
        self.rules = rules
        self.num_layers = cfg.num_layers
        self.num_mtp = cfg.num_mtp_layers
        self._from_hf = [(r, template_regex(r.hf)) for r in rules]
        self._to_hf = [(r, k, template_regex(t)) for r in rules if r.write for k, t in enumerate(r.ours)]

    # checkpoint -> ours

    def _match_hf(self, hf: str) -> tuple[Rule, dict[str, str]] | None:
        for rule, pattern in self._from_hf:
            m = pattern.match(hf)
            if m:
                return rule, m.groupdict()
        return None

    def _mtp_hf(self, hf: str) -> tuple[int, str] | None:
        """`model.layers.{L + k}.rest` -> (k, rest): a tensor of MTP layer k (any k >= 0); else None."""
        m = _HF_LAYER.match(hf)
        if m is None or int(m.group(1)) < self.num_layers:
            return None
        return int(m.group(1)) - self.num_layers, m.group(2)

    def skip(self, hf: str) -> bool:
        """Checkpoint tensors that carry nothing for the model: rotary caches, fp8 scales (read with their
        weight), layers past `num_layers` that the model has no MTP layer for (DeepSeek-V3's layer 61 when
        loaded with mtp=False)."""
        if IGNORED.search(hf):
            return True
        mtp = self._mtp_hf(hf)
        return mtp is not None and mtp[0] >= self.num_mtp

    def our_name(self, hf: str) -> tuple[Placement, ...] | None:
        """Where checkpoint tensor `hf` goes (one placement per chunk); None: not a tensor of this family."""
        mtp = self._mtp_hf(hf)
        if mtp is not None:
            k, rest = mtp
            if rest in MTP_OWN:
                return (Placement(f"mtp.{k}.{MTP_OWN[rest]}"),)
            inner = self.our_name("model.layers.0." + rest)  # its decoder block, named as layer 0's
            if inner is None:
                return None
            return tuple(dataclasses.replace(pl, param=f"mtp.{k}.block." + pl.param.removeprefix("layers.0."))
                         for pl in inner)
        hit = self._match_hf(hf)
        if hit is None:
            return None
        rule, fields = hit
        expert = int(fields["e"]) if "e" in fields else None
        n = len(rule.ours)
        return tuple(Placement(t.format(**fields), expert, k, n, rule.dim) for k, t in enumerate(rule.ours))

    # ours -> checkpoint

    def _find_ours(self, ours: str) -> tuple[Rule, int, dict[str, str]] | None:
        """The written rule for our parameter `ours`, which of its targets it is, and the fields bound."""
        for rule, k, pattern in self._to_hf:
            m = pattern.match(ours)
            if m:
                return rule, k, m.groupdict()
        return None

    def _mtp_ours(self, ours: str) -> tuple[str, str | None, str | None]:
        """Our MTP parameter `mtp.{k}.rest` -> (checkpoint prefix `model.layers.{L + k}.`, the Hub suffix of
        one of its own tensors or None, the block parameter named as layer 0's or None)."""
        m = _OUR_MTP.match(ours)
        prefix, rest = f"model.layers.{self.num_layers + int(m.group(1))}.", m.group(2)
        if rest in _MTP_OWN_REVERSE:
            return prefix, _MTP_OWN_REVERSE[rest], None
        if rest.startswith("block."):
            return prefix, None, "layers.0." + rest.removeprefix("block.")
        raise ConfigError(f"no Hugging Face name for parameter '{ours}' ({self.model_type})")

    def _match_ours(self, ours: str) -> tuple[Rule, int, dict[str, str]]:
        hit = self._find_ours(ours)
        if hit is None:
            raise ConfigError(f"no Hugging Face name for parameter '{ours}' ({self.model_type})")
        return hit

    def stacked(self, ours: str) -> bool:
        """Whether our parameter `ours` is stacked over experts (one checkpoint tensor per row)."""
        if _OUR_MTP.match(ours):
            _, own, inner = self._mtp_ours(ours)
            return own is None and self.stacked(inner)
        hit = self._find_ours(ours)
        return hit is not None and "{e}" in hit[0].hf

    def hf_name(self, ours: str, expert: int | None = None) -> str:
        """The checkpoint tensor that holds our parameter `ours` (row `expert` of a stacked expert
        parameter); for a parameter that is one chunk of a fused tensor, the fused tensor's name."""
        if _OUR_MTP.match(ours):
            prefix, own, inner = self._mtp_ours(ours)
            return prefix + (own or self.hf_name(inner, expert).removeprefix("model.layers.0."))
        rule, _, fields = self._match_ours(ours)
        stacked = "{e}" in rule.hf
        if stacked != (expert is not None):
            need = "needs an expert index" if stacked else "is not stacked over experts"
            raise ValueError(f"'{ours}' {need} ({self.model_type})")
        return rule.hf.format(**fields, e=expert)

    def split_dim(self, ours: str) -> int | None:
        """Along which dimension tensor parallelism splits our parameter `ours`; None: replicated."""
        if _OUR_MTP.match(ours):
            _, own, inner = self._mtp_ours(ours)
            return _MTP_OWN_SPLIT.get(ours.split(".", 2)[2]) if own else self.split_dim(inner)
        rule, _, _ = self._match_ours(ours)
        return rule.split_dim(ours.rpartition(".")[2])

    def hf_module(self, ours: str) -> str:
        """Our module name -> the checkpoint's module name: 'layers.3.attn.wkv_a' ->
        'model.layers.3.self_attn.kv_a_proj_with_mqa', 'layers.0.ffn.experts' -> 'model.layers.0.mlp.experts',
        Qwen v1's 'layers.0.attn.wq' -> 'transformer.h.0.attn.c_attn[q]'. It is the common prefix of the
        checkpoint names of every parameter below the module; a name no rule reaches comes back as is.
        MTP layer k's modules: 'mtp.0.block.attn' -> 'model.layers.{L}.self_attn', 'mtp.0' -> 'model.layers.{L}'."""
        m = re.match(r"^mtp\.(\d+)(?:\.(.+))?$", ours)
        if m:
            prefix = f"model.layers.{self.num_layers + int(m.group(1))}"
            rest = m.group(2) or ""
            if not rest.startswith("block."):
                own = {o.rsplit(".", 1)[0]: h.rsplit(".", 1)[0] for h, o in MTP_OWN.items()}
                return prefix + ("." + own.get(rest, rest) if rest and rest != "block" else "")
            inner = self.hf_module("layers.0." + rest.removeprefix("block."))
            return prefix + "." + inner.removeprefix("model.layers.0.") if inner.startswith("model.") else ours
        segs = ours.split(".") if ours else []
        found: set[tuple[tuple[str, ...], str | None]] = set()
        for rule, k, _ in self._to_hf:
            target = rule.ours[k].split(".")
            fields = _match_segments(target, segs) if len(target) > len(segs) else None
            if fields is None:
                continue
            path = tuple(_fill(rule.hf, fields).split(".")[:-1])  # the module that holds the tensor
            found.add((path, rule.parts[k] if rule.parts else None))
        if not found:
            return ours
        prefix = _common_prefix([list(p) for p, _ in found])
        while prefix and prefix[-1] in _FIELDS:  # 'model.layers.{i}' for 'layers', '...experts.{e}' for experts
            prefix.pop()
        labels = {label for _, label in found}
        name = ".".join(prefix)
        if len(found) == 1 and labels != {None}:
            name += f"[{labels.pop()}]"
        return name

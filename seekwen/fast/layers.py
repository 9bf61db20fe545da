"""The fast path's sibling classes. Each is built from a reference module (`from_reference`) and
replaces it in the model; the reference classes are never edited and keep no fast-path slots.

- `FastAttention`: q, k, v in one product; when there is no q/k norm, q and k rotated in one pass;
- `FastMLA`: the query projection (wq or wq_a) and wkv_a in one product; W_UK / W_UV kept contiguous
  per head for absorbed decode, and on CPU the decode attention as one kernel call (`mla_decode`);
- `FastMLP`: gate and up in one product;
- `GroupedExperts`: per expert one fused gate/up layer and one down layer (fp32 on CPU: all chosen
  experts in one kernel call, `moe_experts`);
- `FastRMSNorm`: one C++ pass per row (fp32 on CPU, `step_ops`) or one fused `F.rms_norm`;
- `TiedEmbedding`: the tied LM head's rows as the embedding.

Every class has `describe()`: which implementation runs, for `fast.plan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import Attention
from ..model.batch import ForwardBatch
from ..model.mla import MLA
from ..model.mlp import MLP
from ..model.moe import Experts, dispatch, dispatch_sorted
from ..model.norm import RMSNorm
from ..model.rope import apply_rope
from . import kernels, linear, paged_kernels, step_ops
from .linear import (
    KERNEL_FORMATS,
    FastLinear,
    _BlockLinear,
    block_linear,
    describe_linear,
    fuse,
    isa_name,
    kernel_operands,
    make_linear,
    weight_format,
    weight_of,
)


class FromReference:
    """`Sibling.from_reference(module, ...)`: the fast module computing what the reference `module` does."""

    @classmethod
    def from_reference(cls, ref: nn.Module, *args, **kwargs):
        return cls(ref, *args, **kwargs)


ROTATION_MAX_TOKENS = 64  # up to this many tokens per call, fp32 on CPU: rotary as one product per tensor


def rotate(x: torch.Tensor, batch: ForwardBatch, interleaved: bool) -> torch.Tensor:
    """`apply_rope(x [B, S, H, d], batch.cos, batch.sin)`; for a few fp32 tokens on CPU as one product
    with the call's shared rotation matrices (`ForwardBatch.rotation`) instead of a dozen small ops."""
    B, S = x.shape[:2]
    if x.dtype == torch.float32 and x.device.type == "cpu" and B * S <= ROTATION_MAX_TOKENS:
        return torch.matmul(x, batch.rotation(interleaved, x.dtype))  # [B, S, H, d] @ [B, S, d, d]
    return apply_rope(x, batch.cos, batch.sin, interleaved)


def fast_linear(layer: nn.Module, quantize: str | None, group_size: int) -> nn.Module:
    bias = None if layer.bias is None else layer.bias.detach()
    blocks = getattr(layer, "gguf_blocks", None)  # Q8_0 / Q4_0 blocks, F16 / BF16 from a GGUF file: as stored
    if blocks is not None and quantize is None:
        return block_linear(*blocks, bias)
    return make_linear(weight_of(layer).detach(), bias, quantize, group_size)


class FastAttention(FromReference, Attention):
    """`Attention` with q/k/v fused into one product (and, without q/k norms, one rotary pass for q and k)."""

    def __init__(self, ref: Attention, quantize: str | None = None, group_size: int = 64):
        nn.Module.__init__(self)
        self.setup(ref.cfg, ref.layer)
        self.wqkv = fuse([ref.wq, ref.wk, ref.wv], quantize, group_size)
        self.wo = fast_linear(ref.wo, quantize, group_size)
        self.q_norm, self.k_norm = ref.q_norm, ref.k_norm

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        kern = paged_kernels.decode_kernel(x, batch, self.layer)
        if kern is None:
            return super().forward(x, batch)
        # decode over a store's blocks (paged cache, or the row cache's rows): store the new k/v, attend in place
        B = x.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.project(x, batch)
        if batch.logn is not None:
            q = q * batch.logn[:, :, None, None].to(q.dtype)
        batch.kv.write(self.layer, batch.positions, 0, k=k, v=v)
        pools, table, _ = batch.kv.blocks(self.layer)
        counts = batch.key_counts
        q = q.reshape(B, Hkv, H // Hkv, hd).contiguous()  # head h = kv head h // G, group member h % G
        none = q.new_empty(0, 0, 0, 0)
        out = kern.paged_attention(q, none, pools["k"], none, pools["v"], table,
                                   paged_kernels.key_starts(counts, self.window), counts, self.scale)
        return self.wo(out.reshape(B, 1, H * hd))

    def project(self, x: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.q_norm is None:  # q and k are adjacent: rotated in one pass
            qk, v = self.wqkv(x).split([(H + Hkv) * hd, Hkv * hd], dim=-1)
            q, k = self.rotate(qk.view(B, S, H + Hkv, hd), batch).split([H, Hkv], dim=2)
            return q, k, v.view(B, S, Hkv, hd)
        q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q, k = self.q_norm(q.view(B, S, H, hd)), self.k_norm(k.view(B, S, Hkv, hd))
        return self.rotate(q, batch), self.rotate(k, batch), v.view(B, S, Hkv, hd)

    def rotate(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.rope_dim != x.shape[-1]:  # partial rotary (Qwen v1): the reference's slicing
            return super().rotate(x, batch)
        return rotate(x, batch, self.interleaved)

    def describe(self) -> str:
        fallback = "grouped-query matmuls" if self.n_kv_heads != self.n_heads else "SDPA"
        if paged_kernels.get() is None:
            return f"fused qkv ({describe_linear(self.wqkv)}); prefill SDPA causal kernel, decode {fallback}"
        return (f"fused qkv ({describe_linear(self.wqkv)}); prefill SDPA causal kernel; decode (fp32) one "
                f"paged_attention kernel call reading the cache in place (ring-buffer window layers: {fallback})")


class FastMLA(FromReference, MLA):
    """`MLA` with the query projection and wkv_a fused, and absorbed attention laid out heads-first
    against contiguous W_UK [H, d_nope, r] / W_UV^T [H, r, d_v]: that form runs as fast matrix-vector
    products on CPU, where the [B, S, H, .] einsum falls back to a slow batched kernel. One new token
    per row on CPU (fp32): the attention is one `paged_attention` call reading the latent cache in place
    (the paged cache's blocks, or the row cache's rows as blocks), so decode stays close to flat as the
    cache grows; elsewhere the absorbed product's own kernel (`kernels.mla_decode`) where it serves."""

    def __init__(self, ref: MLA, quantize: str | None = None, group_size: int = 64):
        nn.Module.__init__(self)
        self.setup(ref.cfg, ref.layer)
        self.mode = ref.mode
        wkv_b = weight_of(ref.wkv_b).detach()  # [H * (nope + v), r]
        w = wkv_b.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        self.w_uk = w[:, : self.nope].contiguous()  # [H, d_nope, r]
        self.w_uv = w[:, self.nope :].transpose(1, 2).contiguous()  # W_UV^T [H, r, d_v]
        # decided once, here: the C++ kernels serve fp32 weights on CPU (kept as a flag, so the module copies)
        self.use_kernels = w.dtype == torch.float32 and w.device.type == "cpu" and kernels.get() is not None
        if self.use_kernels:  # the per-head kernel's layout
            self.w_uk_t = self.w_uk.transpose(1, 2).contiguous()  # [H, r, d_nope]
            self.w_uv_t = w[:, self.nope :].contiguous()  # [H, d_v, r]
        first = ref.wq if ref.q_lora_rank is None else ref.wq_a
        self.wq_kv_a = fuse([first, ref.wkv_a], quantize, group_size)
        if ref.q_lora_rank is not None:
            self.q_norm = ref.q_norm
            self.wq_b = fast_linear(ref.wq_b, quantize, group_size)
        self.kv_norm = ref.kv_norm
        self.wkv_b = FastLinear(wkv_b)  # prefill (naive) path; kept unquantized: it is small
        # a GGUF file's k_b / v_b blocks (loader.keep_mla_head_blocks): W_UK^T [r, nope] and W_UV^T [d_v, r]
        # per head as stored, for the absorbed products on int8 activations (read 4-8x fewer bytes per token)
        heads = getattr(ref.wkv_b, "gguf_heads", None) if quantize is None and self.use_kernels else None
        self.uk_heads = None if heads is None else head_layers(*heads["k_b"])
        self.uv_heads = None if heads is None else head_layers(*heads["v_b"])
        self.wo = fast_linear(ref.wo, quantize, group_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        kern = paged_kernels.decode_kernel(x, batch, self.layer)
        if kern is not None:
            return self.paged_decode(kern, x, batch)
        return super().forward(x, batch)

    def decode_inputs(self, x: torch.Tensor, batch: ForwardBatch):
        """One new token per row x [B, 1, d] -> (q_nope [B, 1, H, d_nope], rotated q_pe [B, 1, H, dr],
        latent c_kv [B, 1, r], rotated k_pe [B, 1, dr]), LogN applied: what both decode paths start from."""
        B, H = x.shape[0], self.n_heads
        q, kv_a = self.project(x)
        q_nope, q_pe = q.view(B, 1, H, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)
        q_pe = rotate(q_pe, batch, self.interleaved)
        k_pe = rotate(k_pe[:, :, None, :], batch, self.interleaved)[:, :, 0]
        if batch.logn is not None:
            s = batch.logn[:, :, None, None].to(q_nope.dtype)
            q_nope, q_pe = q_nope * s, q_pe * s
        return q_nope, q_pe, kv, k_pe

    def paged_decode(self, kern, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Decode over a store's blocks (`paged_kernels.decode_kernel`): absorbed attention reading the
        latent blocks in place."""
        B, H = x.shape[0], self.n_heads
        q_nope, q_pe, kv, k_pe = self.decode_inputs(x, batch)
        batch.kv.write(self.layer, batch.positions, 0, kv=kv, pe=k_pe)
        pools, table, _ = batch.kv.blocks(self.layer)
        q_lat = self.latent_query(q_nope).view(H, B, -1).transpose(0, 1)  # [B, H, r]
        lat, pe = pools["kv"].unsqueeze(2), pools["pe"].unsqueeze(2)  # [N, bs, 1, r], [N, bs, 1, dr]
        counts = batch.key_counts
        o_lat = kern.paged_attention(q_lat[:, None].contiguous(), q_pe.reshape(B, 1, H, self.rope).contiguous(),
                                     lat, pe, lat, table, paged_kernels.key_starts(counts, self.window), counts,
                                     self.scale)  # [B, 1, H, r]
        out = self.latent_out(o_lat[:, 0].transpose(0, 1).contiguous(), B, 1)  # [B, 1, H, d_v]
        return self.wo(out.reshape(B, 1, H * self.v_dim))

    def latent_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, S, H, d_nope] -> the queries in latent space, heads first [H, B*S, r]."""
        B, S, H, _ = q_nope.shape
        q_h = q_nope.permute(2, 0, 1, 3).reshape(H, B * S, self.nope)
        if self.int8_heads(q_h):
            return per_head_qmm(self.uk_heads, q_h, self.kv_lora_rank)
        k = self.mla_kernel(B * S, q_h.dtype) if q_h.device.type == "cpu" else None
        if k is not None:
            return k.f32_bmm(q_h.contiguous(), self.w_uk_t)
        return torch.einsum("hsd,hdr->hsr", q_h, self.w_uk)

    def latent_out(self, o_h: torch.Tensor, B: int, S: int) -> torch.Tensor:
        """Latent attention outputs heads first [H, B*S, r] -> [B, S, H, d_v] (through W_UV)."""
        H = self.n_heads
        k = self.mla_kernel(B * S, o_h.dtype) if o_h.device.type == "cpu" else None
        if self.int8_heads(o_h):
            out = per_head_qmm(self.uv_heads, o_h, self.v_dim)  # [H, B*S, d_v]
        elif k is not None:
            out = k.f32_bmm(o_h.contiguous(), self.w_uv_t)  # [H, B*S, d_v]
        else:
            out = torch.einsum("hsr,hrd->hsd", o_h, self.w_uv)
        return out.view(H, B, S, self.v_dim).permute(1, 2, 0, 3)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_dim = self.q_lora_rank or self.n_heads * (self.nope + self.rope)
        q, kv_a = self.wq_kv_a(x).split([q_dim, self.kv_lora_rank + self.rope], dim=-1)
        if self.q_lora_rank is not None:
            q = self.wq_b(self.q_norm(q))
        return q, kv_a

    def int8_heads(self, x: torch.Tensor) -> bool:
        """Whether the absorbed per-head products run on the file's k_b / v_b blocks (int8 activations)."""
        return (self.uk_heads is not None and linear.ACTIVATIONS == "q8" and x.dtype == torch.float32
                and x.device.type == "cpu")

    def mla_kernel(self, n_rows: int, dtype: torch.dtype):
        """The C++ kernels when they serve this call: CPU fp32 weights, fp32 activations, few rows."""
        if not self.use_kernels or dtype != torch.float32 or not 0 < n_rows <= kernels.MAX_ROWS:
            return None
        return kernels.get()

    def absorbed(self, q_nope, q_pe, kv, k_pe, mask, counts: list[int] | None = None) -> torch.Tensor:
        B, S, H, _ = q_nope.shape
        T = kv.shape[1]
        k = self.mla_kernel(B * S, q_nope.dtype) if q_nope.device.type == "cpu" else None
        q_lat = self.latent_query(q_nope).view(H, B, S, -1).transpose(0, 1).reshape(B, H * S, -1)  # [B, H*S, r]
        q_pe = q_pe.transpose(1, 2).reshape(B, H * S, self.rope)
        if k is not None and self.one_kernel_decode(S, counts, kv.dtype):
            o_lat = k.mla_decode(q_lat.contiguous(), q_pe.contiguous(), kv, k_pe, counts, self.scale)  # [B, H, r]
        else:
            # heads and queries share one batch row per sequence, so each product is a plain bmm against the
            # cached [B, T, .] latents (a transposed view, never copied or expanded per head)
            scores = torch.bmm(q_lat, kv.transpose(1, 2)) + torch.bmm(q_pe, k_pe.transpose(1, 2))  # [B, H*S, T]
            scores = (scores.view(B, H, S, T) * self.scale).masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
            o_lat = torch.bmm(probs.view(B, H * S, T), kv)  # [B, H*S, r]
        o_h = o_lat.view(B, H, S, -1).transpose(0, 1).reshape(H, B * S, self.kv_lora_rank)
        return self.latent_out(o_h, B, S)  # [B, S, H, d_v]

    def one_kernel_decode(self, n_new: int, counts: list[int] | None, dtype: torch.dtype) -> bool:
        """`mla_decode` serves one new token per row with known key counts, fp32, rank a multiple of 16."""
        return n_new == 1 and counts is not None and dtype == torch.float32 and self.kv_lora_rank % 16 == 0

    def describe(self) -> str:
        if paged_kernels.get() is not None:
            decode = "absorbed, one paged_attention kernel call per layer reading the latent cache in place (fp32)"
        elif self.use_kernels and self.kv_lora_rank % 16 == 0:
            decode = f"absorbed, one mla_decode kernel call per layer ({isa_name()})"
        elif self.use_kernels:
            decode = f"absorbed, per-head f32_bmm kernels ({isa_name()}), bmm attention"
        else:
            decode = "absorbed, bmm over the cached latents"
        if self.uk_heads is not None:
            decode += f"; W_UK / W_UV per head from the file's {weight_format(self.uk_heads[0])} blocks (qmm_grouped)"
        return f"fused q/kv_a ({describe_linear(self.wq_kv_a)}); prefill naive SDPA; decode {decode}"


def head_layers(kind: str, q: torch.Tensor, d: torch.Tensor) -> nn.ModuleList:
    """One block-format layer per head from stacked blocks q [H, N, K], d [H, N, K // 32]."""
    return nn.ModuleList(block_linear(kind, q[h], d[h]) for h in range(q.shape[0]))


def per_head_qmm(layers: nn.ModuleList, x_h: torch.Tensor, N: int) -> torch.Tensor:
    """x_h [H, M, K] against head h's block layer [N, K] each, one `qmm_grouped` call -> [H, M, N]. The
    heads' packed blocks are looked up once and kept on the list."""
    k = kernels.get()
    H, M, K = x_h.shape
    if getattr(layers, "packed", None) is None:
        layers.packed = [layer.packed(k) for layer in layers]
    return k.qmm_grouped(x_h.reshape(H * M, K).contiguous(), layers.packed, [M] * H, N).view(H, M, N)


class FastMLP(FromReference, MLP):
    """`MLP` with gate and up in one product."""

    def __init__(self, ref: MLP, quantize: str | None = None, group_size: int = 64):
        nn.Module.__init__(self)
        self.w13 = fuse([ref.w1, ref.w3], quantize, group_size)
        self.w2 = fast_linear(ref.w2, quantize, group_size)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def describe(self) -> str:
        return f"fused gate/up ({describe_linear(self.w13)})"


def expert_projection(experts: Experts, name: str, e: int) -> nn.Module:
    """Expert e's projection `name` (w1 gate, w3 up, w2 down) as a bias-free linear layer over its row of
    the stacked weight, carrying the GGUF file's blocks of it where the loader kept them
    (`Experts.gguf_blocks`), so `fuse` / `fast_linear` build it as stored."""
    w = getattr(experts, name)[e].detach()  # [out, in], a view
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(w, requires_grad=False)
    blocks = getattr(experts, "gguf_blocks", {}).get(name)
    if blocks is not None:
        kind, q, d = blocks
        layer.gguf_blocks = (kind, q[e], None if d is None else d[e])
        layer.weight_unloaded = name in getattr(experts, "unloaded", ())  # a lean GGUF load: w is unfilled
    return layer


class GroupedExperts(FromReference, nn.Module):
    """E SwiGLU experts, each a fused gate/up layer w13 [dim -> 2*inter] and a down layer w2.

    Tokens are grouped by expert with one argsort; each expert that received tokens runs one
    product over exactly those tokens. With few tokens (decode) that is at most N*k experts, each
    read once, in place. fp32 on CPU with at most `kernels.MAX_ROWS` tokens: all chosen experts run in
    one C++ call (`kernels.moe_experts`: two threaded passes over their weights, no per-expert ops)."""

    def __init__(self, experts: Experts, quantize: str | None = None, group_size: int = 64):
        super().__init__()
        E = experts.w1.shape[0]
        self.n_experts = E

        def proj(name: str, e: int) -> nn.Module:
            return expert_projection(experts, name, e)

        self.w13 = nn.ModuleList(fuse([proj("w1", e), proj("w3", e)], quantize, group_size) for e in range(E))
        self.w2 = nn.ModuleList(fast_linear(proj("w2", e), quantize, group_size) for e in range(E))
        # moe_experts' case, decided once: fp32 weights as loaded, or bf16 / f16 / q8_0 / q4_0, on CPU
        on_cpu = experts.w1.device.type == "cpu"
        fp32_or_format = quantize is not None or experts.w1.dtype == torch.float32
        served = all(weight_format(la) in KERNEL_FORMATS for la in (*self.w13, *self.w2))
        self.use_kernels = on_cpu and fp32_or_format and served and kernels.get() is not None
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # expert -> its qpack'ed blocks

    @property
    def int8_activations(self) -> bool:
        """Whether the experts run qmm_experts: Q8_0 / Q4_0 layers in the default "q8" mode (ACTIVATIONS)."""
        return (linear.ACTIVATIONS == "q8" and isinstance(self.w13[0], _BlockLinear)
                and isinstance(self.w2[0], _BlockLinear))


    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13[e](h).chunk(2, dim=-1)
        return self.w2[e](F.silu(gate) * up)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights/indices [N, k] -> sum_k weights * expert_k(x) [N, dim]."""
        N, k = indices.shape
        any_rows = self.int8_activations  # qmm_experts: any number of tokens
        fused = self.use_kernels and x.dtype == torch.float32 and 0 < N and (any_rows or N <= kernels.MAX_ROWS)
        if N == 1:
            return self._one_token(kernels.get() if fused else None, x, weights, indices)
        if fused:
            return self._fused_forward(kernels.get(), x, weights, indices)
        return dispatch(x, weights, indices, self.n_experts, self.expert)

    def _one_token(self, kern, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decode, one token x [1, dim]: its k experts in ascending order (the order `dispatch` sums them
        in), without the grouping machinery (no argsort, bincount, gather or index_add)."""
        chosen = indices[0].tolist()
        order = sorted(range(len(chosen)), key=chosen.__getitem__)
        experts = [chosen[j] for j in order]
        w = weights[0, order]  # [k] in the experts' order
        if kern is not None:  # every chosen expert in one kernel call: k rows, one per expert
            ys = self._kernel_experts(kern, x.expand(len(experts), -1).contiguous(), experts, [1] * len(experts))
        else:
            ys = torch.cat([self.expert(e, x) for e in experts])  # [k, dim]
        return (ys * w[:, None]).sum(0, keepdim=True).to(x.dtype)

    def _fused_forward(self, kern, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`dispatch`'s grouping, with the experts themselves in one C++ call over the chosen experts'
        weights (read in place)."""

        def run(xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
            active = [e for e, n in enumerate(counts) if n]
            return self._kernel_experts(kern, xs.contiguous(), active, [counts[e] for e in active])

        return dispatch_sorted(x, weights, indices, self.n_experts, run)

    def _kernel_experts(self, kern, xs: torch.Tensor, experts: list[int], rows: list[int]) -> torch.Tensor:
        """xs [sum(rows), dim], rows[i] of them for experts[i] -> their SwiGLU outputs, one moe_experts call
        over the experts' weights in their format (read in place); Q8_0 / Q4_0 with int8 activations (the
        layers' default, `linear.ACTIVATIONS`): one qmm_experts call over their packed blocks."""
        if self.int8_activations:
            packed = [self.packed(kern, e) for e in experts]
            return kern.qmm_experts(xs, [p13 for p13, _ in packed], [p2 for _, p2 in packed], rows,
                                    self.w2[0].in_features)
        op13 = [kernel_operands(self.w13[e]) for e in experts]  # (weight, block scales or None)
        op2 = [kernel_operands(self.w2[e]) for e in experts]
        scaled = op13[0][1] is not None, op2[0][1] is not None
        return kern.moe_experts(xs, [w for w, _ in op13], [w for w, _ in op2], rows,
                                [d for _, d in op13] if scaled[0] else [], [d for _, d in op2] if scaled[1] else [])

    def packed(self, kern, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate/up, down) blocks as qmm_experts reads them, looked up once (a decode step
        touches k experts per layer: no per-step calls into each layer)."""
        if e not in self._packed:
            self._packed[e] = self.w13[e].packed(kern), self.w2[e].packed(kern)
        return self._packed[e]

    def describe(self) -> str:
        if self.use_kernels:
            fmt = weight_format(self.w13[0])
            if self.int8_activations:
                return (f"{self.n_experts} experts, chosen ones in one qmm_experts kernel call ({fmt}, int8 "
                        f"activations, {kernels.get().qisa()}, any number of tokens)")
            return (f"{self.n_experts} experts, chosen ones in one moe_experts kernel call ({fmt}, {isa_name()}, "
                    f"<= {kernels.MAX_ROWS} tokens), else grouped per expert")
        return f"{self.n_experts} experts grouped by expert, one fused product each ({describe_linear(self.w13[0])})"


class FastRMSNorm(FromReference, RMSNorm):
    """RMSNorm as one fused op, sharing the reference's weight: fp32 on CPU one C++ pass per row
    (`step_ops.rms_norm`; `F.rms_norm` costs ~10 us a call there, a decode step has 2-3 per layer), else
    `F.rms_norm`. For fp32 both are the reference's math (up to summation order). On CUDA `F.rms_norm`
    is used for every dtype (one kernel instead of ~7 per norm, which matters when a decode step is a few
    hundred tiny kernels): it normalises in fp32 and rounds once, where the reference (HF) rounds the
    normalised value to bf16 before scaling; the difference is within one bf16 rounding."""

    def __init__(self, ref: RMSNorm):
        nn.Module.__init__(self)
        self.eps, self.weight = ref.eps, ref.weight
        cpu_fp32 = self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
        self.use_ops = cpu_fp32 and step_ops.get() is not None  # a flag, so the module copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_ops and step_ops.usable(x, self.weight):
            return step_ops.get().rms_norm(x, self.weight, self.eps)
        if (x.dtype == torch.float32 or x.is_cuda) and self.weight.dtype == x.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return super().forward(x)

    def describe(self) -> str:
        if self.use_ops:
            return "one C++ pass per row (step_ops.rms_norm)"
        fused = self.weight.dtype == torch.float32 or self.weight.is_cuda
        return "one fused F.rms_norm" if fused else "RMSNorm in fp32, rounded as transformers does"


class TiedEmbedding(nn.Module):
    """Embedding lookup from the tied LM head's weight [vocab, hidden]: ids -> rows."""

    def __init__(self, head: FastLinear):
        super().__init__()
        self.head = [head]  # not a submodule: the head owns the weight

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight  # [vocab, hidden]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

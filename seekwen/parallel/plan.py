"""What each rank holds: the `ParallelPlan` (tp, ep, this rank's place) and the local `ModelConfig`.

The layout is DeepSeek-V3's reference `inference/model.py`:

- attention heads split over `tp` ranks (GQA: q/k/v rows of the rank's heads, a KV head shared by
  several ranks when there are fewer KV heads than ranks; MLA: the per-head up-projections `wq`/`wq_b`
  and `wkv_b`, while the latent projections, their norms and the latent cache stay whole on every rank);
- dense MLPs and shared experts split on the intermediate dimension;
- the vocabulary split for the embedding and the LM head;
- routed experts split by expert index over `ep` ranks; with `ep = 1`, each expert's intermediate
  dimension over the `tp` ranks instead;
- norms and routers replicated (every rank routes identically).

For now `tp` and `ep` are each 1 or the world size, so every collective runs over the whole group.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


class ParallelError(ValueError):
    """A model / world-size combination that cannot be split, or ranks that disagree."""


@dataclass(frozen=True)
class ParallelPlan:
    world: int  # processes in the group
    rank: int  # this process
    tp: int  # ranks splitting heads, dense MLPs, shared experts and the vocabulary (1 or world)
    ep: int  # ranks splitting the routed experts by index (1 or world)

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp > 1 else 0

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep > 1 else 0

    @property
    def expert_tp(self) -> int:
        """Ranks splitting each routed expert's intermediate dimension: tp when experts are not split by index."""
        return self.tp if self.ep == 1 else 1

    @property
    def routed_split(self) -> bool:
        """Whether a rank's routed-expert output is a partial sum (split by index or by intermediate dim)."""
        return self.ep > 1 or self.expert_tp > 1

    def describe(self) -> str:
        return f"tp={self.tp} ep={self.ep}, rank {self.rank} of {self.world}"


def make_plan(world: int, rank: int, tp: int | None, ep: int | None) -> ParallelPlan:
    """tp default: the world size; ep default: 1. Each must be 1 or the world size (for now)."""
    tp = world if tp is None else int(tp)
    ep = 1 if ep is None else int(ep)
    for name, n in (("tp", tp), ("ep", ep)):
        if n < 1:
            raise ParallelError(f"{name} must be >= 1, got {n}")
        if n not in (1, world):
            hint = "" if world > 1 else f": launch {n} processes, e.g. torchrun --nproc-per-node {n} -m seekwen ..."
            raise ParallelError(f"{name}={n} with {world} process(es): {name} must be 1 or the world size "
                                f"({world}) for now{hint}")
    return ParallelPlan(world, rank, tp, ep)


def _need(what: str, size: int, by: int, name: str) -> None:
    if size % by:
        raise ParallelError(f"{what} = {size} is not divisible by {name} = {by}")


def check(cfg: ModelConfig, plan: ParallelPlan) -> None:
    """Raise a `ParallelError` naming the size and the divisor for anything the plan cannot split."""
    tp = plan.tp
    _need("num_attention_heads", cfg.num_heads, tp, "tp")
    if cfg.mla is None and cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ParallelError(f"num_key_value_heads = {cfg.num_kv_heads} neither divides nor is divisible by tp = {tp}")
    _need("vocab_size", cfg.vocab_size, tp, "tp")
    if not (cfg.mlp_layers and all(cfg.mlp_layers)):  # some layers have a dense MLP
        _need("intermediate_size", cfg.intermediate_size, tp, "tp")
    m = cfg.moe
    if m is None or not cfg.is_moe:
        if plan.ep > 1:
            raise ParallelError(f"ep = {plan.ep}: {cfg.model_type} has no routed experts to split")
        return
    if plan.ep > m.n_routed_experts:
        raise ParallelError(f"ep = {plan.ep} is larger than the number of routed experts ({m.n_routed_experts})")
    _need("n_routed_experts", m.n_routed_experts, plan.ep, "ep")
    _need("moe_intermediate_size (each routed expert's)", m.intermediate_size, plan.expert_tp, "tp")
    if m.shared_intermediate_size:
        _need("the shared experts' intermediate size", m.shared_intermediate_size, tp, "tp")


def local_kv_heads(cfg: ModelConfig, tp: int) -> int:
    return cfg.num_kv_heads // tp if cfg.num_kv_heads >= tp else 1


def kv_head_start(cfg: ModelConfig, plan: ParallelPlan) -> int:
    """The first KV head rank `tp_rank` holds: its own slice, or the one head its query heads share."""
    if cfg.num_kv_heads >= plan.tp:
        return plan.tp_rank * (cfg.num_kv_heads // plan.tp)
    return plan.tp_rank * cfg.num_kv_heads // plan.tp


def local_config(cfg: ModelConfig, plan: ParallelPlan) -> ModelConfig:
    """The config of this rank's shard: local head counts and intermediate sizes. The vocabulary size and
    the number of routed experts stay global (the router is replicated; `ParallelTransformer` builds the
    local embedding, head and expert stack itself), so `generate` and the engine see the real vocabulary
    and the KV cache is sized by the local KV heads (MLA: the whole latent, replicated)."""
    tp = plan.tp
    moe = cfg.moe
    if moe is not None:
        moe = type(moe)(**{**vars(moe), "intermediate_size": moe.intermediate_size // plan.expert_tp,
                           "shared_intermediate_size": moe.shared_intermediate_size // tp})
    inter = cfg.intermediate_size // tp if cfg.intermediate_size % tp == 0 else cfg.intermediate_size
    return cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=local_kv_heads(cfg, tp),
                       intermediate_size=inter, moe=moe)

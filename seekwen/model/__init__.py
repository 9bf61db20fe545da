"""Model math shared by every family: norms, RoPE and its scalings, attention, MLA, MoE."""

from .transformer import Transformer

__all__ = ["Transformer"]

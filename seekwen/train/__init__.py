"""Training: byte-level BPE tokenizer, packed token data, initialisation, DeepSeek-V3 load balancing,
and a resumable AdamW loop that writes Hugging Face checkpoints (`seekwen train`)."""

from .loop import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]

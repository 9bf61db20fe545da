"""The one Hugging Face boundary: everything that knows how the Hub spells a model.

- `families`: the registry of `model_type`s, each a config.json parser plus its weight-name rules;
- `loader` (checkpoints in: safetensors only), `export` (checkpoints out), `tokenizer` and
  `qwen_tiktoken` (tokenizers).

Everything past this package speaks only `ModelConfig` and our own parameter names.
"""

from .export import save_hf, to_hf_config, to_hf_state_dict
from .families import FAMILIES, Family, family_for, parse_config
from .loader import CheckpointError, build, load, load_state, read_config, resolve

__all__ = [
    "FAMILIES", "Family", "family_for", "parse_config",
    "CheckpointError", "build", "load", "load_state", "read_config", "resolve",
    "save_hf", "to_hf_config", "to_hf_state_dict",
]

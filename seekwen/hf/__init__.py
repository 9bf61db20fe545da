"""The one Hugging Face boundary: everything that knows how the Hub spells a model.

- `families`: the registry of `model_type`s, each a config.json parser plus its weight-rule list;
- `names`: the rules, in groups the families compose, and the one two-way `NameMap` (our parameter
  names <-> checkpoint names, with each parameter's tensor-parallel split) that loading, export,
  `seekwen trace` and error messages all use;
- `loader` (checkpoints in: safetensors only), `export` (checkpoints out), `tokenizer` and
  `qwen_tiktoken` (tokenizers).
"""

from .export import save_hf, to_hf_config, to_hf_state_dict
from .families import FAMILIES, Family, family_for, name_map, parse_config
from .loader import CheckpointError, build, load, load_state, read_config, resolve
from .names import NameMap, Placement, Rule

__all__ = [
    "FAMILIES", "Family", "family_for", "name_map", "parse_config", "NameMap", "Placement", "Rule",
    "CheckpointError", "build", "load", "load_state", "read_config", "resolve",
    "save_hf", "to_hf_config", "to_hf_state_dict",
]

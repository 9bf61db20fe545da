"""seekwen: run, explain and train the DeepSeek and Qwen model families.

    import seekwen
    model = seekwen.load("path-or-hub-id", dtype=torch.float32)  # under torchrun: tp=, ep= (seekwen.parallel)
    logits = model(input_ids)                       # [B, S] -> [B, S, vocab]
    new_ids = model.generate(input_ids, max_new_tokens=24, temperature=0.0)
"""

from .config import ConfigError, ModelConfig
from .hf.loader import CheckpointError, build, resolve
from .model import Transformer
from .parallel import load  # one process, or this rank's shard under torchrun (tp=, ep=)
from .runtime.generate import generate

# `model.generate(...)`: the runtime's generate as a method. Attached here, at the top of the package, so
# that the model package never imports the runtime (docs/design.md: the dependency order).
Transformer.generate = generate

__version__ = "0.1.0"
__all__ = ["load", "build", "resolve", "Transformer", "ModelConfig", "ConfigError", "CheckpointError", "__version__"]

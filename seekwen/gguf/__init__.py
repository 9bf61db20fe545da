"""GGUF in: llama.cpp's / ollama's model files loaded into seekwen's `Transformer`, through the `gguf`
package (`pip install 'seekwen[gguf]'`).

    model = seekwen.load("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf")   # seekwen.load dispatches here

- `reader`: the file (metadata, tensors in PyTorch order), `GGUFError`;
- `config`: metadata -> the equivalent HF config dict -> `ModelConfig` (the HF family parsers);
- `names`: llama.cpp's tensor names -> ours, and the converter's splits/fusions undone;
- `quant`: F32/F16/BF16, Q8_0/Q4_0 blocks -> (q, d), K-quants dequantized; `linear_from_blocks`;
- `tokenizer`: HF files beside the GGUF, else a byte-level BPE rebuilt from the metadata;
- `loader`: `load(path, ...)`, `is_gguf(path)`.
Supported: llama.cpp architectures qwen2, qwen3, qwen2moe, qwen3moe, deepseek2 (DeepSeek-V2/V3/R1) and
deepseek (DeepSeek-MoE v1).
"""

from .loader import gguf_file, is_gguf, load
from .reader import GGUFError, GGUFFile

__all__ = ["load", "is_gguf", "gguf_file", "GGUFError", "GGUFFile"]

"""`seekwen bench`, split by job:

- `checkpoints`: synthetic Hub-format checkpoints in real models' shapes (BENCH_MODELS, build_checkpoint);
- `machine`: the machine probe (read bandwidth, matmul peak), timing and memory helpers;
- `roofline`: weight bytes a decode step reads, matmul work per token, parameter counts;
- `runners`: the same measurements for seekwen (`Ours`) and transformers (`HF`), timers, interleaving;
- `sections`: one model loaded into a `Bench`, and the prefill / decode / batch / context sections;
- `report`: the printed lines and ratios, the per-model summary;
- `ppl`: the perplexity change from quantization on held-out text;
- `command`: `register` (the argument parser) and `run` (the command), re-exported here for the CLI.
"""

from .command import register, run

__all__ = ["register", "run"]

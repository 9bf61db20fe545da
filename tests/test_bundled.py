"""The bundled seekwen-kjv-v3 is a standard DeepSeek-V3 Hugging Face checkpoint: transformers loads it
and computes the same logits as seekwen."""

from __future__ import annotations

import json

import pytest
import torch

import seekwen
from seekwen.tools.common import bundled_model_path

PATH = bundled_model_path()
pytestmark = pytest.mark.skipif(not (PATH / "model.safetensors").is_file(), reason="bundled model not built")


def test_bundled_layout():
    raw = json.loads((PATH / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
    heads, head_dim = raw["num_attention_heads"], raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"]
    assert raw["kv_lora_rank"] < heads * head_dim  # a real MLA latent bottleneck
    assert raw["first_k_dense_replace"] >= 1 and raw["n_routed_experts"] >= 8
    assert raw["num_experts_per_tok"] >= 2 and raw["n_shared_experts"] == 1
    assert raw["num_nextn_predict_layers"] == 1  # one DeepSeek-V3 MTP layer (--speculative mtp offline)
    size = sum(f.stat().st_size for f in PATH.iterdir())
    assert size < 24 * 2**20  # 15 MB main model + 7.6 MB MTP layer (bf16) + tokenizer
    tok_cfg = json.loads((PATH / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"]


@pytest.mark.slow
def test_transformers_loads_bundled_with_same_logits():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(PATH), dtype=torch.float32).eval()
    model = seekwen.load(PATH, dtype=torch.float32)
    ids = torch.tensor([model.tokenizer.encode("In the beginning God created the heaven and the earth.")])
    ids = torch.cat([ids, torch.randint(0, model.cfg.vocab_size, (1, 40))], dim=1)
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    # the routers' e_score_correction_bias was trained (auxiliary-loss-free balancing) and is used by both
    bias = model.layers[1].ffn.gate.bias
    assert bias.abs().sum() > 0
    assert torch.equal(hf.model.layers[1].mlp.gate.e_score_correction_bias.float(), bias)


def test_bundled_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(PATH))
    tok = seekwen.load(PATH).tokenizer
    text = "And God said, Let there be light: and there was light."
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    messages = [{"role": "user", "content": "Who made the earth?"}]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(messages, add_generation_prompt=True)

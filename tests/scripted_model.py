"""A tiny checkpoint whose greedy output is known in advance: a "bigram" Qwen2 model.

Every layer's attention output and MLP down-projection are zero, so the final hidden state is the current
token's embedding (RMS-normed), and the LM head maps it to the next token of a script: after `KEY` (the
newline token) it writes SCRIPT, then EOS. With the chat template below, whose generation prompt opens
`<think>` and ends with a newline, a chat reply is: reasoning "Let me think." then `</think>` (one token of
the bundled tokenizer) then the answer 中文😀é€, whose UTF-8 bytes are one byte-level token each.
The bundled model's tokenizer is reused (vocabulary 4096).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from hf_models import Spec, hf_config, save_hub_checkpoint
from tokenizers import Tokenizer

from seekwen.tools.common import bundled_model_path

REASONING = "Let me think."
ANSWER = "中文😀é€"
SCRIPT_TEXT = REASONING + "</think>" + ANSWER
KEY_TEXT = "\n"
EOS = 1
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
            "{% elif message['role'] == 'user' %}<｜User｜>{{ message['content'] }}{% elif message['role'] == "
            "'assistant' %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def script_ids(tok: Tokenizer) -> tuple[int, list[int]]:
    key = tok.encode(KEY_TEXT, add_special_tokens=False).ids
    ids = tok.encode(SCRIPT_TEXT, add_special_tokens=False).ids
    assert len(key) == 1 and len(set(ids)) == len(ids) and key[0] not in ids and EOS not in ids, (key, ids)
    return key[0], ids


def make_scripted_checkpoint(folder: Path, max_len: int = 4096) -> Path:
    src = bundled_model_path()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    key, ids = script_ids(tok)
    V, H = tok.get_vocab_size(), 64
    spec = Spec("scripted", "qwen2", dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len,
                                          bos_token_id=0, eos_token_id=EOS, pad_token_id=2))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), attn_implementation="eager").float()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = torch.randn(V, H)
        model.model.embed_tokens.weight.copy_(emb)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        head = torch.zeros(V, H)
        for a, b in zip([key] + ids, ids + [EOS], strict=True):
            head[b] = 10 * emb[a] / emb[a].norm()
        model.lm_head.weight.copy_(head)
    folder = Path(folder)
    save_hub_checkpoint(model, spec, folder)
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    cfg["model_max_length"] = max_len
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    return folder

"""A test-side GGUF writer: a Hugging Face checkpoint folder -> a GGUF file written the way llama.cpp's
`convert_hf_to_gguf.py` writes one (its tensor names from `gguf`'s own `TensorNameMap`, the same
stacking of experts, the same split of MLA's kv_b into k_b / v_b, the same metadata keys, the same
choice of which tensors stay F32, ggml-exact quantized blocks from `gguf.quants.quantize`).

It is independent of seekwen's reader (it starts from HF names, never from ours), but it is ours: the
fixtures under tests/fixtures/gguf were written by the real converter, to catch what both could misread.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

ARCH = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
        "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "deepseek_v2": gguf.MODEL_ARCH.DEEPSEEK2,
        "deepseek_v3": gguf.MODEL_ARCH.DEEPSEEK2, "deepseek": gguf.MODEL_ARCH.DEEPSEEK}
FTYPE = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
         "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
         "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def hf_tensors(folder: Path, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors after the converter's own rewrites, still under HF-style names."""
    return converted({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}, cfg)


def converted(state: dict[str, torch.Tensor], cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """The converter's rewrites of HF tensors (the whole checkpoint, or any part of it that holds every
    expert of the layers it has: experts are stacked per layer and projection)."""
    out, experts = [], {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= cfg["num_hidden_layers"]:
            continue  # DeepSeek-V3's MTP layers: the converter's DeepseekV2Model skips them (skip_mtp)
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = t
            continue
        if name.endswith("kv_b_proj.weight"):  # MLA: split per head, k_b transposed
            H, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            k_b, v_b = t.view(H, nope + v, t.shape[-1]).split([nope, v], dim=1)
            out.append((name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2).contiguous()))
            out.append((name.replace("kv_b_proj", "v_b_proj"), v_b.contiguous()))
            continue
        if cfg["model_type"] == "deepseek" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg.get("num_key_value_heads",
                                                                                 cfg["num_attention_heads"])
            t = permute(t, heads)
        out.append((name.replace("e_score_correction_bias", "e_score_correction.bias"), t))
    for (layer, proj), per_expert in sorted(experts.items()):
        stacked = torch.stack([per_expert[e] for e in range(len(per_expert))])
        out.append((f"model.layers.{layer}.mlp.experts.{proj}.weight", stacked))
    return out


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's LLaMA-style q/k row permutation (DeepseekModel.permute): per head, rotate-half rows
    (i, i + d/2) -> adjacent pairs (2i, 2i + 1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(gguf_name: str, t: torch.Tensor, wanted: str) -> str:
    """The converter's rule: 1-D tensors, norms, routers and biases F32; the rest in the file's type."""
    if t.dim() <= 1 or gguf_name.endswith("_norm.weight") or gguf_name.endswith(_ALWAYS_F32):
        return "F32"
    if not gguf_name.endswith(".weight"):
        return "F32"
    return wanted


def encode(t: torch.Tensor, kind: str) -> tuple[np.ndarray, str]:
    """(data for GGUFWriter.add_tensor, the type actually used): rows that do not split into blocks fall
    back to F16, as the converter does."""
    data = t.numpy().astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    try:
        return gguf.quants.quantize(data, qtype), kind
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), "F16"


def write_metadata(w: gguf.GGUFWriter, cfg: dict, kind: str) -> None:
    mt = cfg["model_type"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    mla = mt in ("deepseek_v2", "deepseek_v3")
    w.add_head_count_kv(1 if mla else cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_scaling") or {}
    if rope.get("type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "beta_fast" in rope:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if "beta_slow" in rope:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    elif rope.get("type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if cfg.get("num_experts") or cfg.get("n_routed_experts"):
        w.add_expert_count(cfg.get("num_experts") or cfg["n_routed_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    if cfg.get("scoring_func") in ("sigmoid", "softmax"):
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg["scoring_func"] == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if mt in ("qwen2_moe", "qwen3_moe"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if mla:
        _deepseek_metadata(w, cfg)
    if mt == "deepseek":  # DeepSeek-MoE v1 (DeepseekModel.set_gguf_parameters)
        w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
        w.add_vocab_size(cfg["vocab_size"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_scale(1.0)
        w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_file_type(FTYPE[kind])


def _deepseek_metadata(w: gguf.GGUFWriter, cfg: dict) -> None:
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    r, rope_dim = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_kv_lora_rank(r)
    w.add_key_length(r + rope_dim)
    w.add_value_length(r)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg.get("n_shared_experts", 0))
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope_dim)
    rope = cfg.get("rope_scaling") or {}
    if rope.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def write_gguf(folder: Path, out: Path, kind: str = "F32", types: dict[str, str] | None = None,
               tokenizer: dict | None = None, tensors=None) -> dict[str, str]:
    """Convert the HF checkpoint in `folder` to `out` with tensors of `kind` (F32, F16, BF16, Q8_0, Q4_0);
    `types` overrides the type per GGUF tensor name (e.g. K-quants written as raw blocks elsewhere);
    `tokenizer`: GGUF tokenizer keys to add; `tensors`: an iterable of `converted` (name, tensor) pairs to
    write instead of the folder's model.safetensors (only its config.json is read then), consumed one at a
    time. Returns GGUF name -> type written."""
    cfg = json.loads((folder / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    write_metadata(w, cfg, kind)
    if tokenizer:
        add_tokenizer(w, **tokenizer)
    written = {}
    for hf_name, t in hf_tensors(folder, cfg) if tensors is None else tensors:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        want = (types or {}).get(name, tensor_type(name, t, kind))
        data, used = encode(t, want)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[used])
        written[name] = used
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def add_tokenizer(w: gguf.GGUFWriter, tokens: list[str], types: list[int], merges: list[str], pre: str,
                  bos: int | None = None, eos: int | None = None, add_bos: bool | None = None,
                  chat_template: str | None = None) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)


def tokenizer_keys(tokenizer_json: Path, pre: str, vocab_size: int | None = None) -> dict:
    """The converter's tokenizer metadata (`get_vocab_base` + `SpecialVocab`) for a tokenizer.json folder."""
    tj = json.loads(tokenizer_json.read_text())
    vocab = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    n = vocab_size or max([*vocab.values(), *added]) + 1
    reverse = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i]["special"] else 4)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(1)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    cfg_path = tokenizer_json.parent / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}

    def tok_id(key):
        v = tc.get(key)
        v = v["content"] if isinstance(v, dict) else v
        return ids.get(v)

    return dict(tokens=tokens, types=types, merges=merges, pre=pre, bos=tok_id("bos_token"), eos=tok_id("eos_token"),
                add_bos=tc.get("add_bos_token"), chat_template=tc.get("chat_template"))

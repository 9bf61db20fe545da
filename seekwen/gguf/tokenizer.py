"""The tokenizer of a GGUF file: the HF tokenizer files beside it when there are any, else a byte-level BPE
(`tokenizers`) built from the metadata llama.cpp's converter writes:

- `tokenizer.ggml.model` "gpt2" (byte-level BPE; the only kind Qwen2/3 and DeepSeek-V2/V3 use),
  `tokenizer.ggml.tokens` (in the byte-level alphabet, as in tokenizer.json), `.merges` ("a b"),
  `.token_type` (1 normal, 3 control = special, 4 user-defined = added but not special, 5 unused);
- `tokenizer.ggml.pre` names the pre-tokenizer; its split regexes are those of the model's own
  tokenizer.json (llama.cpp keeps the same lists, rewritten for std::regex);
- `bos_token_id` / `eos_token_id` / `add_bos_token`, and `tokenizer.chat_template`.
"""

from __future__ import annotations

from ..hf.tokenizer import Tokenizer
from .reader import GGUFError, GGUFFile

# the pre-tokenizers of the supported families' tokenizer.json files, as lists of isolated splits
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_V3 = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?["
    "\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
# (written with escapes: the class ranges must survive any Unicode normalization of this file)
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
    "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-"
    "\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113"
    "\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-"
    "\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0"
    "-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,), "megrez": (_QWEN2,), "qwen35": (_QWEN35,),
    "deepseek-v3": _DEEPSEEK_V3, "deepseek-llm": _DEEPSEEK_LLM, "gpt-2": (_GPT2,), "default": (_GPT2,),
}
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5


def gguf_tokenizer(f: GGUFFile) -> Tokenizer | None:
    """The HF tokenizer in the GGUF file's folder when there is one, else one built from the metadata;
    None when the file has no vocabulary."""
    beside = Tokenizer.from_folder(f.path.parent)
    if beside is not None:
        return beside
    if f.get("tokenizer.ggml.tokens") is None:
        return None
    return tokenizer_from_metadata(f)


def tokenizer_from_metadata(f: GGUFFile) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer model '{kind}' is not supported (byte-level BPE, 'gpt2', only)")
    pre = f.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{f.path}: pre-tokenizer '{pre}' is not supported ({', '.join(sorted(PRE_TOKENIZERS))}); "
                        "put the model's tokenizer.json beside the GGUF file")
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges") or []]
    added = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
    # every token in the BPE vocabulary under its GGUF id; added tokens are then registered by content, so
    # they keep those ids (unused padding entries are unreachable: no merge produces them)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False) for i in sorted(added)
                    if types[i] == USER_DEFINED])
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(added)
                            if types[i] == CONTROL])
    _check_ids(f, tok, tokens, types)
    config = {"add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token") or False)}
    for key in ("bos", "eos", "padding"):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config["pad_token" if key == "padding" else f"{key}_token"] = tokens[i]
    return Tokenizer(tok, config, f.get("tokenizer.chat_template"))


def _check_ids(f: GGUFFile, tok, tokens: list[str], types: list[int]) -> None:
    """Every token must come back under its GGUF id (an added token whose text a vocabulary entry also
    spells would not): a tokenizer that renumbers would silently feed the model wrong ids."""
    for i, text in enumerate(tokens):
        if types[i] != UNUSED and tok.token_to_id(text) != i:
            raise GGUFError(f"{f.path}: token {i} {text!r} of the GGUF vocabulary maps to id {tok.token_to_id(text)} "
                            "in the rebuilt tokenizer; put the model's tokenizer.json beside the GGUF file")

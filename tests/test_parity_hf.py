"""Parity with transformers for every family it ships: tiny random checkpoints written the way Hub
checkpoints are (see hf_models.py), loaded with `seekwen.load`, compared in fp32.

- a left-padded batch: transformers gets explicit position_ids = cumsum(mask) - 1, seekwen derives
  positions from the attention mask itself; only real positions are compared;
- an input 3x longer than max_position_embeddings;
- greedy generate, unpadded and left-padded, token for token against `generate(do_sample=False)`.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from hf_models import PINNED_TRANSFORMERS, SPECS, hf_greedy, hf_positions

import seekwen
from seekwen.hf.families import parse_config

TOL = 1e-4
N_NEW = 8

pytestmark = pytest.mark.skipif(
    transformers.__version__ != PINNED_TRANSFORMERS,
    reason=f"parity tests are pinned to transformers=={PINNED_TRANSFORMERS}",
)


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, hub_checkpoint):
    spec = SPECS[request.param]
    hf, folder = hub_checkpoint(spec.name)
    ours = seekwen.load(folder, dtype=torch.float32)
    return spec, hf, ours, folder


def _batch(vocab: int, lens: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = max(lens)
    ids = torch.randint(3, vocab, (len(lens), S), generator=g)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, S - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_checkpoint_is_hub_format(pair):
    spec, hf, ours, folder = pair
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in raw and "layer_types" not in raw
    assert "rope_theta" in raw and "rope_scaling" in raw and raw["torch_dtype"] == "bfloat16"
    if spec.model_type.startswith("deepseek"):
        assert "head_dim" not in raw and "qk_head_dim" not in raw
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    if "moe" in spec.model_type or spec.model_type.startswith("deepseek"):
        assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)
        assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)


def test_config_reads_like_transformers(pair):
    spec, hf, ours, _ = pair
    c, h = ours.cfg, hf.config
    assert c.num_layers == h.num_hidden_layers
    if spec.name == "qwen2_sliding":  # derived from use_sliding_window + max_window_layers, no layer_types
        assert c.sliding_window == [None, 6, 6]
        assert h.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    elif spec.name == "qwen2_moe_sliding":  # the Qwen2-MoE rule: odd (1-based) layers below max_window_layers
        assert c.sliding_window == [6, None, 6, None]
        assert h.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    else:
        assert all(w is None for w in c.sliding_window)
    if c.moe is not None:
        hf_moe = [type(layer.mlp).__name__.lower().endswith(("moe", "moeblock", "sparsemoeblock"))
                  for layer in hf.model.layers]
        assert c.mlp_layers == hf_moe, (c.mlp_layers, [type(layer.mlp).__name__ for layer in hf.model.layers])


def test_transformers5_config_reads_the_same(pair, tmp_path):
    """The same model's config.json as transformers 5 writes it (rope_parameters, layer_types,
    num_local_experts, head_dim) parses to the same ModelConfig as the Hub-format one."""
    spec, hf, ours, folder = pair
    hf.config.save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in v5
    got = parse_config(v5)
    for f in dataclasses.fields(got):
        if f.name not in ("raw", "torch_dtype", "eos_token_id"):  # load() also reads generation_config.json EOS
            assert getattr(got, f.name) == getattr(ours.cfg, f.name), f.name


@torch.no_grad()
def test_padded_batch_logits(pair):
    spec, hf, ours, _ = pair
    ids, mask = _batch(hf.config.vocab_size, [12, 7, 3, 12])
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert got.shape == ref.shape
    err = (got[real] - ref[real]).abs().max().item()
    assert err <= TOL, f"{spec.name}: max |dlogits| = {err:.3g} on real tokens"
    # and every row equals the same sequence run alone, unpadded
    for b in range(ids.shape[0]):
        alone = ours(ids[b][real[b]][None])
        assert (alone[0] - got[b][real[b]]).abs().max().item() <= TOL


@torch.no_grad()
def test_three_times_longer_than_context(pair):
    spec, hf, ours, _ = pair
    S = 3 * spec.max_pos
    ids = torch.randint(3, hf.config.vocab_size, (1, S), generator=torch.Generator().manual_seed(2))
    ref = hf(input_ids=ids).logits
    got = ours(ids)
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"{spec.name}: max |dlogits| = {err:.3g} at length {S}"


def test_greedy_generate_unpadded(pair):
    spec, hf, ours, _ = pair
    ids = torch.randint(3, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = hf_greedy(hf, ids, None, N_NEW)
    got = ours.generate(ids, max_new_tokens=N_NEW, eos_token_id=[], stop_at_eos=False)
    assert torch.equal(got, ref), f"{spec.name}:\n{got}\n{ref}"


def test_greedy_generate_left_padded(pair):
    spec, hf, ours, _ = pair
    ids, mask = _batch(hf.config.vocab_size, [10, 4, 7], seed=4)
    ref = hf_greedy(hf, ids, mask, N_NEW)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=[], stop_at_eos=False)
    assert torch.equal(got, ref), f"{spec.name}:\n{got}\n{ref}"

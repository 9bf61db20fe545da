"""The per-step host work of decode (fast path, CPU): the rotary product, the C++ RMSNorm, the one-token
MoE and MLA decode paths and the flattened decode cache write each equal what they replace, and a whole
decode through them equals the plain reference decode (fp32 logits within 1e-5, greedy identical) for MLA,
GQA, q/k-norm, sliding-window, MoE and Qwen v1 checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hf_models import SPECS
from test_qwen_v1 import write_qwen_v1

import seekwen
from seekwen.fast import layers as fast_layers
from seekwen.fast import paged_kernels, prepare, step_ops
from seekwen.model.norm import RMSNorm
from seekwen.model.rope import apply_rope, rope_matrix
from seekwen.runtime.cache import KVCache
from seekwen.runtime.decoder import Decoder

TOL = 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matrix_equals_apply_rope(interleaved):
    torch.manual_seed(0)
    B, S, H, d = 2, 3, 4, 16
    angles = torch.rand(B, S, d // 2) * 50  # far positions: large angles
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(B, S, H, d)
    want = apply_rope(x, cos, sin, interleaved)
    got = torch.matmul(x, rope_matrix(cos, sin, interleaved))
    assert (got - want).abs().max() <= 1e-6
    other = apply_rope(x, cos, sin, not interleaved)
    assert (got - other).abs().max() > 1e-2  # the two pair layouts really differ


def test_step_ops_rms_norm_equals_reference():
    ops = step_ops.get()
    if ops is None:
        pytest.skip("no C++ compiler here")
    torch.manual_seed(0)
    ref = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.3)
    x = torch.randn(3, 5, 64)[..., 8:56] * 3  # a strided view: copied to rows first
    fast = fast_layers.FastRMSNorm(ref)
    assert fast.use_ops and "C++" in fast.describe()
    with torch.inference_mode():
        assert (fast(x) - ref(x)).abs().max() <= 1e-6
        assert (ops.rms_norm(x, ref.weight, 1e-6) - F.rms_norm(x, (48,), ref.weight, 1e-6)).abs().max() <= 1e-6
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.randn(2, 47), ref.weight.detach(), 1e-6)
    x.requires_grad_(True)  # with autograd on, the reference math (which has a backward) runs
    assert fast(x).requires_grad


def test_decode_cache_write_lands_in_each_rows_slot():
    cache = KVCache.__new__(KVCache)  # one layer [B, T, 2] store: write() needs no config
    cache.cfg, cache.max_len, cache.windows = None, 6, {}
    cache.layers = [{"k": torch.zeros(3, 6, 2)}]
    view = cache.rows(1, 3)  # rows 1 and 2 of the pool
    positions = torch.tensor([[4], [0]])
    new = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # [B, 1, 2]
    seen = view.write(0, positions, 5, k=new)["k"]
    store = cache.layers[0]["k"]
    assert torch.equal(store[1, 4], new[0, 0]) and torch.equal(store[2, 0], new[1, 0])
    assert store.abs().sum() == 10  # nothing else written (row 0 untouched)
    assert seen.shape == (2, 5, 2) and torch.equal(seen[0, 4], new[0, 0])


def _models(name: str, hub_checkpoint, tmp_path):
    if name == "qwen_v1":
        folder = tmp_path / "qwen_v1"
        write_qwen_v1(folder)
    else:
        _, folder = hub_checkpoint(SPECS[name].name)
    plain = seekwen.load(folder, dtype=torch.float32, fast=False)
    return plain, prepare(copy.deepcopy(plain))


def _decode(model, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Prefill n_prompt tokens, then one decode step per remaining token: logits [B, S - n_prompt + 1, V]."""
    dec = Decoder(model, ids.shape[0], ids.shape[1], compiled_step=False)  # the Python layers' step
    logits = [dec.prefill(ids[:, :n_prompt])[:, None]]
    for t in range(n_prompt, ids.shape[1]):
        logits.append(dec.step(ids[:, t])[:, None])
    return torch.cat(logits, dim=1)


@torch.inference_mode()
@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2", "qwen2", "qwen2_sliding", "qwen3", "qwen2_moe",
                                  "qwen_v1"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_decode_equals_plain(name, batch, hub_checkpoint, tmp_path, monkeypatch):
    """The decode steps through the fast path's per-step code (attention: one paged_attention call over the
    row cache's rows read in place, except ring-buffer window layers; rotary products; one-token MoE at
    batch 1) give the plain reference decode's logits and greedy tokens."""
    plain, fast = _models(name, hub_checkpoint, tmp_path)
    calls = {"in_place": 0, "ring": 0, "one_token": 0}
    decode_kernel, one_token = paged_kernels.decode_kernel, fast_layers.GroupedExperts._one_token

    def counted_decode_kernel(x, batch_, layer):
        kern = decode_kernel(x, batch_, layer)
        if x.shape[1] == 1:
            ring = batch_.kv.is_ring(layer)
            calls["ring" if ring else "in_place"] += 1
            assert (kern is None) == ring or paged_kernels.get() is None
        return kern

    def counted_one_token(self, *args):
        calls["one_token"] += 1
        return one_token(self, *args)

    monkeypatch.setattr(paged_kernels, "decode_kernel", counted_decode_kernel)
    monkeypatch.setattr(fast_layers.GroupedExperts, "_one_token", counted_one_token)
    vocab = plain.cfg.vocab_size
    ids = torch.randint(3, vocab, (batch, 14), generator=torch.Generator().manual_seed(batch))
    want, got = _decode(plain, ids, 6), _decode(fast, ids, 6)
    assert (got - want).abs().max() <= TOL
    steps = ids.shape[1] - 6
    assert calls["in_place"] + calls["ring"] == steps * plain.cfg.num_layers
    assert calls["in_place"] > 0
    if plain.cfg.moe is not None and batch == 1:
        assert calls["one_token"] > 0
    a = plain.generate(ids[:, :6], max_new_tokens=8, stop_at_eos=False)
    b = fast.generate(ids[:, :6], max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(a, b)

"""`seekwen train`: loss falls, checkpoints resume bit-exactly, exports load with seekwen.load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import seekwen
from seekwen.config import ConfigError
from seekwen.hf.export import save_hf, to_hf_state_dict
from seekwen.hf.families import parse_config
from seekwen.train import TrainConfig, Trainer, balance
from seekwen.train.init import init_weights
from seekwen.train.presets import preset

TEXT = str(Path(__file__).parent / "data" / "genesis.txt")


def tiny_cfg(out: Path, steps: int, **kw) -> TrainConfig:
    model = {**preset("tiny-v3"), "hidden_size": 48, "moe_intermediate_size": 24, "intermediate_size": 96}
    base = dict(model=model, texts=[TEXT], out=str(out), vocab_size=400, seq_len=32, batch_size=4, steps=steps,
                lr=3e-3, warmup=4, val_every=10, eval_interval=1000, save_interval=1000, log_interval=5, seed=7)
    return TrainConfig(**{**base, **kw})


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and does not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_loss_falls_and_reload(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path / "run", steps=30, lr=1e-2), log=quiet)
    before = tr.evaluate()["loss"]
    hist = tr.run(progress=False)
    after = hist.val[-1]["loss"]
    assert hist.train[-1]["loss"] < hist.train[0]["loss"] - 0.5
    assert after < before - 0.5, (before, after)
    # the output folder is a plain HF checkpoint: seekwen.load gives the trained model back
    model = seekwen.load(tmp_path / "run", dtype=torch.float32)
    ids = torch.tensor([model.tokenizer.encode("And God said")])
    tr.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), tr.model(ids))
    assert model.tokenizer.decode(ids[0].tolist()) == "And God said"
    # expert-load statistics were logged for the MoE layer
    assert hist.load and hist.load[-1]["layers"]


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {f"param.{n}": p.detach().clone() for n, p in tr.model.named_parameters()}
    out.update({f"optim.{k}": v for k, v in tr._optimizer_tensors().items() if not k.startswith("rng.")})
    return out


def test_resume_is_exact(tmp_path):
    steps = 12
    full = Trainer(tiny_cfg(tmp_path / "full", steps, seq_aux_alpha=1e-2), log=quiet)
    full.run(progress=False)
    part = Trainer(tiny_cfg(tmp_path / "part", steps, seq_aux_alpha=1e-2), log=quiet)
    part.run(stop_at=7, progress=False)
    assert (tmp_path / "part" / "trainer_state.json").is_file()
    del part
    saved_rng = load_file(str(tmp_path / "part" / "optimizer.safetensors"))["rng.cpu"]
    torch.manual_seed(12345)  # the resumed run must restore the RNG itself
    resumed = Trainer(tiny_cfg(tmp_path / "part", steps, seq_aux_alpha=1e-2), resume=True, log=quiet)
    assert resumed.step == 7
    assert torch.equal(torch.get_rng_state(), saved_rng)
    resumed.run(progress=False)
    assert resumed.step == full.step == steps
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.batches.state() == full.batches.state()
    # the router bias really moved (auxiliary-loss-free balancing), and is saved as e_score_correction_bias
    bias = load_file(str(tmp_path / "part" / "model.safetensors"))["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().sum() > 0
    assert torch.equal(bias, resumed.model.layers[1].ffn.gate.bias)


def test_bias_update_direction():
    cfg = parse_config({**preset("tiny-v3"), "vocab_size": 64})
    model = seekwen.build(cfg, torch.float32)
    init_weights(model)
    counts = {1: torch.tensor([10.0, 0.0, 3.0, 3.0])}
    balance.update_bias(model, counts, 0.5)
    assert model.layers[1].ffn.gate.bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    stats = balance.load_stats(counts)[1]
    assert stats["max_ratio"] == pytest.approx(10 / 4)


def test_sequence_balance_loss_is_one_when_balanced():
    cfg = parse_config({**preset("tiny-v3"), "vocab_size": 64})
    model = seekwen.build(cfg, torch.float32)
    init_weights(model)
    gate = model.layers[1].ffn.gate
    E, K = 4, 2
    gate.last_scores = torch.full((8, E), 0.3)  # uniform affinities, each expert chosen equally often
    gate.last_indices = torch.tensor([[0, 1], [2, 3]] * 4)
    assert float(balance.sequence_balance_loss(model, batch_size=2)) == pytest.approx(K / K)  # sum_i f_i P_i = 1
    gate.last_indices = torch.tensor([[0, 1]] * 8)  # collapsed onto two experts: f = (2, 2, 0, 0)
    assert float(balance.sequence_balance_loss(model, batch_size=2)) == pytest.approx(1.0)
    gate.last_scores = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * 8)  # ... and they also get the affinity mass
    assert float(balance.sequence_balance_loss(model, batch_size=2)) > 1.5


QWEN2 = {
    "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}
QWEN3_MOE = {
    **QWEN2, "model_type": "qwen3_moe", "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "norm_topk_prob": True, "tie_word_embeddings": False,
}


@pytest.mark.parametrize("raw", [QWEN2, QWEN3_MOE], ids=["qwen2", "qwen3_moe"])
def test_export_round_trip_other_families(tmp_path, raw):
    torch.manual_seed(0)
    model = seekwen.build(parse_config(dict(raw)), torch.float32)
    init_weights(model, std=0.1)
    save_hf(model, tmp_path)
    again = seekwen.load(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, raw["vocab_size"], (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_export_refuses_qwen_v1():
    raw = {"model_type": "qwen", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4,
           "num_hidden_layers": 1, "intermediate_size": 64, "seq_length": 64}
    model = seekwen.build(parse_config(raw), torch.float32)
    with pytest.raises(ConfigError, match="Qwen"):
        to_hf_state_dict(model)


def test_hold_out_rule_is_one_function():
    """split's validation chunks are held_out_chunks' (what bench scores): every val_every-th chunk of
    seq_len + 1 tokens, starting at val_every // 2; val_every 0 holds nothing out."""
    from seekwen.train.data import held_out, held_out_chunks, split

    ids = torch.arange(10 * 8 + 3, dtype=torch.int32)  # 10 chunks of 8 tokens (seq_len 7) and a tail of 3
    assert held_out(10, 4).nonzero().flatten().tolist() == [2, 6] and not held_out(10, 0).any()
    s = split(ids, 7, 4)
    assert torch.equal(s.val, held_out_chunks(ids, 7, 4)) and s.val[:, 0].tolist() == [16, 48]
    assert len(s.train) == 8 * 8 + 3

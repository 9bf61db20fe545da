"""Training DeepSeek-V3's multi-token-prediction layers (`seekwen train --mtp-layers N --mtp-weight λ`):
the V3 report's objective lowers the MTP loss, the layers are exported in the Hub layout
(`model.layers.{L}.*`) and load back for speculation, and runs with MTP resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import TEXT, quiet, tiny_cfg

import seekwen
from seekwen.cli import main
from seekwen.model.mtp import mtp_logits
from seekwen.train import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mtp_cfg(out, steps, layers=2, **kw):
    cfg = tiny_cfg(out, steps, **kw)
    cfg.model = {**cfg.model, "num_nextn_predict_layers": layers}
    return cfg


def test_mtp_training_lowers_mtp_loss_and_exports_hub_layout(tmp_path):
    tr = Trainer(mtp_cfg(tmp_path / "run", steps=30, lr=1e-2), log=quiet)
    assert len(tr.model.mtp) == 2
    assert tr.model.mtp[0].embed.weight is tr.model.embed.weight  # shared, as in the report
    before = tr.evaluate()
    hist = tr.run(progress=False)
    after = hist.val[-1]
    assert after["mtp_loss"] < before["mtp_loss"] - 0.5 and after["loss"] < before["loss"] - 0.5
    L = tr.model.cfg.num_layers
    names = set(load_file(str(tmp_path / "run" / "model.safetensors")))
    for k in (0, 1):
        assert {f"model.layers.{L + k}.eh_proj.weight", f"model.layers.{L + k}.embed_tokens.weight",
                f"model.layers.{L + k}.shared_head.head.weight", f"model.layers.{L + k}.enorm.weight",
                f"model.layers.{L + k}.self_attn.kv_a_proj_with_mqa.weight"} <= names
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_nextn_predict_layers"] == 2
    model = seekwen.load(tmp_path / "run", dtype=torch.float32, fast=False)
    ids = torch.tensor([model.tokenizer.encode("And God said, Let there be light")])
    tr.model.eval()
    with torch.no_grad():
        seq = torch.cat((ids, ids[:, :1]), 1)
        a = mtp_logits(model, model(ids, return_hidden=True)[1], seq)
        b = mtp_logits(tr.model, tr.model(ids, return_hidden=True)[1], seq)
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    out = model.generate(ids, max_new_tokens=12)
    assert torch.equal(model.generate(ids, max_new_tokens=12, speculative="mtp", num_speculative_tokens=2), out)


def test_mtp_resume_is_exact(tmp_path):
    full = Trainer(mtp_cfg(tmp_path / "full", 8, layers=1), log=quiet)
    full.run(progress=False)
    part = Trainer(mtp_cfg(tmp_path / "part", 8, layers=1), log=quiet)
    part.run(stop_at=4, progress=False)
    resumed = Trainer(mtp_cfg(tmp_path / "part", 8, layers=1), resume=True, log=quiet)
    assert resumed.model.mtp[0].head.weight is resumed.model.head.weight
    resumed.run(progress=False)
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_mtp_layers_flag_needs_deepseek_v3(tmp_path, capsys):
    cfg = tmp_path / "qwen.json"
    cfg.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 300}))
    assert main(["train", TEXT, "--config", str(cfg), "--out", str(tmp_path / "o"), "--mtp-layers", "1"]) == 2
    assert "--mtp-layers needs a deepseek_v3 model config" in capsys.readouterr().err


def test_train_only_mtp_from_a_trained_model_keeps_the_main_model_exact(tmp_path):
    """`--init-from DIR --mtp-layers 1 --train-only mtp`: the main model's weights and router biases are
    those of DIR, bit for bit, after training (so are its logits); only the MTP layer learns."""
    base = Trainer(tiny_cfg(tmp_path / "base", 6), log=quiet)
    base.run(progress=False)
    out = tmp_path / "mtp"
    args = ["train", TEXT, "--init-from", str(tmp_path / "base"), "--mtp-layers", "1", "--train-only", "mtp",
            "--out", str(out), "--steps", "12", "--lr", "1e-2", "--seq-len", "32", "--batch-size", "4",
            "--eval-interval", "12", "--bias-update-rate", "1e-2", "--seq-aux-alpha", "1e-3", "--quiet"]
    assert main(args) == 0
    before = seekwen.load(tmp_path / "base", dtype=torch.float32, fast=False)
    after = seekwen.load(out, dtype=torch.float32, fast=False)
    assert len(after.mtp) == 1 and len(before.mtp) == 0
    main_after = {n: p for n, p in after.state_dict().items() if not n.startswith("mtp.")}
    assert main_after.keys() == before.state_dict().keys()
    for n, p in before.state_dict().items():
        assert torch.equal(p, main_after[n]), n
    moments = [k for k in load_file(str(out / "optimizer.safetensors")) if not k.startswith("rng.")]
    assert moments and all(k.startswith("mtp.0.") for k in moments)  # AdamW held only the MTP layer's
    assert any(k.startswith("mtp.0.eh_proj.") for k in moments)
    hist = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    val = [h for h in hist if h["kind"] == "val"]
    assert val and "mtp_loss" in val[-1]
    ids = torch.tensor([before.tokenizer.encode("And God said, Let there be light")])
    with torch.no_grad():
        assert torch.equal(before(ids), after(ids))  # the main model did not move


def test_train_only_mtp_needs_mtp_layers(tmp_path):
    cfg = tiny_cfg(tmp_path / "x", 2)
    cfg.train_only = "mtp"
    with pytest.raises(ValueError, match="needs MTP layers"):
        Trainer(cfg, log=quiet)

"""The compiled decode step (`fast.compiled_step`, csrc/step.h): a whole CPU decode step in one C++ call.

It must equal the Python step of the same prepared model (the layers it replaces) and the plain reference
decode, for every family and weight format it serves; say why where it does not serve a model (and then
the Python step runs); and keep the Python step's errors (a full cache, a bad token id)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hf_models import SPECS
from test_qwen_v1 import write_qwen_v1

import seekwen
from seekwen.fast import compiled_step, kernels, linear, prepare
from seekwen.runtime.decoder import Decoder

TOL = 1e-5
FIXTURES = Path(__file__).parent / "fixtures" / "gguf"

pytestmark = pytest.mark.skipif(kernels.get() is None, reason="no C++ kernels here")


def decode_steps(model, ids: torch.Tensor, lens: torch.Tensor, steps: int, compiled: bool):
    """Prefill each row's first lens[b] tokens (right-padded), then `steps` greedy decode steps; returns
    (logits [steps + 1, B, V], the decoder). Rows hold different lengths, so their positions differ."""
    B = ids.shape[0]
    dec = Decoder(model, B + 1, ids.shape[1] + steps + 1, compiled_step=compiled)
    logits = [dec.prefill(ids, lens)]
    for _ in range(steps):
        logits.append(dec.step(logits[-1].argmax(-1)))
    return torch.stack(logits), dec


def _count_python_steps(monkeypatch) -> dict:
    calls = {"python": 0}
    model_step = Decoder.model_step

    def counted(self, tokens):
        calls["python"] += 1
        return model_step(self, tokens)

    monkeypatch.setattr(Decoder, "model_step", counted)
    return calls


SERVED = ["deepseek_v3", "deepseek_v2", "deepseek_v2_no_q_lora", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"]


@torch.inference_mode()
@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_step_equals_python_step_and_reference(name, batch, hub_checkpoint, monkeypatch):
    """fp32: every decode step's logits equal the Python fast step's and the plain reference's within 1e-5,
    with the rows at different positions (MLA with and without q_lora, GQA with QKV bias, q/k norms,
    every router: noaux_tc groups, group-limited greedy, softmax top-k, Qwen2-MoE's shared gate)."""
    _, folder = hub_checkpoint(SPECS[name].name)
    plain = seekwen.load(folder, dtype=torch.float32, fast=False)
    fast = prepare(copy.deepcopy(plain))
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, plain.cfg.vocab_size, (batch, 7), generator=gen)
    lens = torch.tensor([7, 4, 6][:batch])
    want, _ = decode_steps(plain, ids, lens, 8, compiled=False)
    python, _ = decode_steps(fast, ids, lens, 8, compiled=False)
    calls = _count_python_steps(monkeypatch)
    got, dec = decode_steps(fast, ids, lens, 8, compiled=True)
    assert dec.compiled is not None and calls["python"] == 0  # every step ran in C++
    assert (got - python).abs().max() <= TOL
    assert (got - want).abs().max() <= TOL
    a = plain.generate(ids[:, :4], max_new_tokens=8, stop_at_eos=False)  # (the plain model: Python steps)
    calls["python"] = 0
    b = fast.generate(ids[:, :4], max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(a, b) and calls["python"] == 0


@torch.inference_mode()
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe", "qwen3"])
def test_compiled_step_many_rows(name, hub_checkpoint, monkeypatch):
    """Past 16 rows (up to 64) the compiled step still equals the Python step: fp32 layers switch to the
    prefill GEMM as FastLinear does, every few-row kernel runs its register tile again, and the experts
    see more than 16 rows each."""
    _, folder = hub_checkpoint(SPECS[name].name)
    model = seekwen.load(folder, dtype=torch.float32)
    B = 40
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.cfg.vocab_size, (B, 6), generator=gen)
    lens = torch.randint(1, 7, (B,), generator=gen)
    python, _ = decode_steps(model, ids, lens, 3, compiled=False)
    calls = _count_python_steps(monkeypatch)
    got, dec = decode_steps(model, ids, lens, 3, compiled=True)
    assert dec.compiled is not None and calls["python"] == 0
    assert (got - python).abs().max() <= TOL


@torch.inference_mode()
@pytest.mark.parametrize("name,quantize", [(n, q) for n in ("deepseek_v3", "qwen2_moe") for q in
                                           ("bf16", "f16", "q8_0", "q4_0")] +
                         [(n, q) for n in ("qwen2", "qwen3") for q in ("int8", "int4")])
@pytest.mark.parametrize("mode", ["q8", "fp32"])
def test_compiled_step_equals_python_step_quantized(name, quantize, mode, hub_checkpoint, monkeypatch):
    """Each weight format runs the kernel the layer itself runs for a few rows (bf16_mm / mm for 16-bit
    weights, qmm on int8 activations or mm exact for the GGUF blocks, int8_mm, int4_mm; the experts'
    moe_experts / qmm_experts), so the compiled step equals the Python step of the same quantized model in
    both block-activation modes (up to the glue's rounding, which int8 activations can move by a step)."""
    _, folder = hub_checkpoint(SPECS[name].name)
    model = seekwen.load(folder, dtype=torch.float32, quantize=quantize)
    ids = torch.randint(3, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([6, 3])
    with linear.block_activations(mode):
        python, _ = decode_steps(model, ids, lens, 6, compiled=False)
        calls = _count_python_steps(monkeypatch)
        got, dec = decode_steps(model, ids, lens, 6, compiled=True)
    assert dec.compiled is not None and calls["python"] == 0
    exact = mode == "fp32" or quantize in ("f16", "int8", "int4")
    scale = python.abs().max().item()
    assert (got - python).abs().max() <= (TOL if exact else 2e-3) * max(1.0, scale)


@torch.inference_mode()
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_compiled_step_runs_gguf_blocks(fmt, monkeypatch):
    """A GGUF DeepSeek file: the layers' blocks, the experts' packed blocks (qmm_experts) and, where the
    file stores them, MLA's per-head k_b / v_b blocks (qmm_grouped) run in the compiled step as in the
    Python step."""
    model = seekwen.load(FIXTURES / "deepseek_v3" / f"deepseek_v3-{fmt}.gguf", dtype=torch.float32)
    ids = torch.randint(3, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([5, 2])
    python, _ = decode_steps(model, ids, lens, 6, compiled=False)
    calls = _count_python_steps(monkeypatch)
    got, dec = decode_steps(model, ids, lens, 6, compiled=True)
    assert dec.compiled is not None and calls["python"] == 0
    assert (got - python).abs().max() <= 2e-3 * max(1.0, python.abs().max().item())


@torch.inference_mode()
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2"])
def test_compiled_step_under_each_instruction_set(name, isa, hub_checkpoint):
    """The kernels the compiled step calls dispatch on the instruction set like the layers' own calls:
    forced to AVX2 or AVX-512, the two steps still agree."""
    _, folder = hub_checkpoint(SPECS[name].name)
    model = seekwen.load(folder, dtype=torch.float32)
    ids = torch.randint(3, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    lens = torch.tensor([5, 3])
    python, _ = decode_steps(model, ids, lens, 5, compiled=False)
    got, dec = decode_steps(model, ids, lens, 5, compiled=True)
    assert dec.compiled is not None and (got - python).abs().max() <= TOL


@torch.inference_mode()
def test_bundled_model_compiled_step_and_plan():
    """The bundled model (MLA, sigmoid noaux_tc MoE, one dense layer) decodes the same greedy tokens with
    and without the compiled step, and the runtime's plan says which step runs."""
    from seekwen.runtime.load import bundled_model_path

    model = seekwen.load(bundled_model_path(), dtype=torch.float32)
    ids = torch.arange(3, 11)[None]
    want, _ = decode_steps(model, ids, torch.tensor([8]), 24, compiled=False)
    got, dec = decode_steps(model, ids, torch.tensor([8]), 24, compiled=True)
    assert (got - want).abs().max() <= TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    plan = dict(dec.describe())
    assert "one C++ call" in plan["decode steps"]
    off = Decoder(model, 1, 16, compiled_step=False)
    assert "one C++ call" not in dict(off.describe())["decode steps"]


def test_unserved_models_say_why(hub_checkpoint, tmp_path, monkeypatch):
    """Where the compiled step does not serve a model the Python step runs, and the Decoder says why;
    compiled_step=True makes that an error."""
    _, folder = hub_checkpoint(SPECS["qwen2_sliding"].name)
    ring = seekwen.load(folder, dtype=torch.float32)
    dec = Decoder(ring, 1, 32)
    assert dec.compiled is None and "ring" in dec.compiled_why
    with pytest.raises(ValueError, match="compiled step does not serve"):
        Decoder(ring, 1, 32, compiled_step=True)
    write_qwen_v1(tmp_path / "qwen_v1")
    v1 = seekwen.load(tmp_path / "qwen_v1", dtype=torch.float32)
    assert "LogN" in Decoder(v1, 1, 32).compiled_why
    plain = seekwen.load(folder, dtype=torch.float32, fast=False)
    assert "prepared" in Decoder(plain, 1, 32).compiled_why
    _, folder = hub_checkpoint(SPECS["qwen2"].name)
    bf16 = seekwen.load(folder, dtype=torch.bfloat16)
    assert "fp32" in Decoder(bf16, 1, 32).compiled_why
    int8_moe = seekwen.load(hub_checkpoint(SPECS["qwen2_moe"].name)[1], dtype=torch.float32, quantize="int8")
    assert "experts' kernels" in Decoder(int8_moe, 1, 32).compiled_why  # (no kernel runs int8 experts at once)
    monkeypatch.setenv("SEEKWEN_COMPILED_STEP", "0")
    assert "off" in Decoder(seekwen.load(folder, dtype=torch.float32), 1, 32).compiled_why


@torch.inference_mode()
def test_compiled_step_errors_and_fallbacks(hub_checkpoint, monkeypatch):
    """A full cache is the Python step's ValueError; a bad token id is an error, not a read out of bounds;
    more than 64 rows and a router that records its choices (`seekwen routes`) take the Python step."""
    _, folder = hub_checkpoint(SPECS["deepseek_v3"].name)
    model = seekwen.load(folder, dtype=torch.float32)
    V = model.cfg.vocab_size
    dec = Decoder(model, 1, 4, compiled_step=True)
    dec.prefill(torch.tensor([[3, 4, 5, 6]]))
    with pytest.raises(ValueError, match="KV cache is full"):
        dec.step(torch.tensor([7]))
    dec = Decoder(model, 2, 8, compiled_step=True)
    dec.prefill(torch.tensor([[3, 4], [5, 6]]))
    with pytest.raises(RuntimeError, match="out of range"):
        dec.step(torch.tensor([3, V]))
    calls = _count_python_steps(monkeypatch)
    dec = Decoder(model, 66, 8, compiled_step=True)
    dec.prefill(torch.randint(3, V, (66, 3)))
    dec.step(torch.randint(3, V, (66,)))
    assert calls["python"] == 1
    dec.step(torch.randint(3, V, (5,)))
    assert calls["python"] == 1
    gate = next(b.ffn.gate for b in model.layers if hasattr(b.ffn, "gate"))
    gate.record = True
    try:
        dec.step(torch.randint(3, V, (5,)))
        assert calls["python"] == 2 and gate.last_indices is not None
    finally:
        gate.record, gate.last_indices = False, None


@torch.inference_mode()
def test_compiled_step_follows_the_block_activation_mode(hub_checkpoint):
    """Built in one block-activation mode, a step in the other rebuilds it for that mode."""
    _, folder = hub_checkpoint(SPECS["qwen2"].name)
    model = seekwen.load(folder, dtype=torch.float32, quantize="q8_0")
    ids = torch.randint(3, model.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    with linear.block_activations("fp32"):
        want, _ = decode_steps(model, ids, torch.tensor([5]), 3, compiled=False)
    dec = Decoder(model, 1, 16, compiled_step=True)
    assert dec.compiled.mode == linear.ACTIVATIONS == "q8"
    with linear.block_activations("fp32"):
        got = [dec.prefill(ids)]
        for _ in range(3):
            got.append(dec.step(got[-1].argmax(-1)))
        assert dec.compiled.mode == "fp32"
    assert (torch.stack(got) - want).abs().max() <= TOL


def test_linear_spec_refuses_what_it_cannot_run():
    class Other(torch.nn.Module):
        pass

    with pytest.raises(compiled_step.Unserved, match="Other"):
        compiled_step.linear_spec(kernels.get(), Other())


@torch.inference_mode()
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_sliding", "qwen2_moe"])
def test_paged_engine_runs_the_compiled_step(name, hub_checkpoint, monkeypatch):
    """The paged engine's one-token-row steps (decode rows, small prefill chunks) run through the compiled
    step over the block pools (`run_paged`: block tables per cache group, sliding-window groups included,
    logits only for the rows due) and generate what the Python layers generate."""
    from seekwen.runtime.engine import Engine, SamplingParams

    _, folder = hub_checkpoint(SPECS[name].name)
    model = seekwen.load(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (7, 4, 9)]
    calls = {"n": 0}
    run_paged = compiled_step.CompiledStep.run_paged

    def counted(self, *args):
        calls["n"] += 1
        return run_paged(self, *args)

    monkeypatch.setattr(compiled_step.CompiledStep, "run_paged", counted)
    got = Engine(model, max_batch=3, max_len=40, paged=True, block_size=4).generate(prompts, params)
    assert calls["n"] > 0
    monkeypatch.setenv("SEEKWEN_COMPILED_STEP", "0")
    want = Engine(model, max_batch=3, max_len=40, paged=True, block_size=4).generate(prompts, params)
    assert got == want and calls["n"] > 0

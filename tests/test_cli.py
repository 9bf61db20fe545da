"""The command line end to end, as a user runs it (subprocesses): generate, chat, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seekwen.tools.chat import ThinkSplitter
from seekwen.tools.common import bundled_model_path

HAS_BUNDLED = (bundled_model_path() / "model.safetensors").is_file()
needs_bundled = pytest.mark.skipif(not HAS_BUNDLED, reason="bundled model not built")


def seekwen(*args: str, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "seekwen", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
@needs_bundled
def test_generate_bundled_streams_text():
    r = seekwen("generate", "And God said", "--max-new-tokens", "24", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("And God said")
    words = r.stdout.split()
    assert len(words) > 6
    assert "tokens/s" in r.stderr and "Traceback" not in r.stderr
    # greedy decoding is deterministic; --quiet drops the speed line
    a = seekwen("generate", "--max-new-tokens", "12", "--temperature", "0", "--quiet")
    b = seekwen("generate", "--max-new-tokens", "12", "--temperature", "0", "--quiet")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("In the beginning")
    assert a.stderr == ""


@pytest.mark.slow
@needs_bundled
def test_chat_two_turns_from_stdin():
    r = seekwen("chat", "--max-new-tokens", "16", "--seed", "0", stdin="Who made the heaven?\nAnd the earth?\n")
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2, r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@needs_bundled
def test_prompt_longer_than_context():
    r = seekwen("generate", "word " * 2000, "--max-new-tokens", "4")
    assert r.returncode == 2
    assert "context" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


BAD = [
    (["generate", "--model", "/nonexistent/model-dir", "hi"], "nonexistent"),
    (["chat", "--model", "/nonexistent/model-dir"], "nonexistent"),
    (["generate", "--temperature", "-1", "hi"], "--temperature"),
    (["generate", "--top-p", "0", "hi"], "--top-p"),
    (["generate", "--top-p", "1.5", "hi"], "--top-p"),
    (["generate", "--top-k", "-3", "hi"], "--top-k"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["train", "/nonexistent/corpus.txt", "--out", "{tmp}/run"], "corpus.txt"),
    (["train", "{binary}", "--out", "{tmp}/run"], "UTF-8"),
    (["train", "{text}", "--out", "{tmp}/run", "--preset", "nope"], "preset"),
    (["train", "{text}", "--out", "{tmp}/run", "--lr", "-1"], "--lr"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_is_one_line_error(tmp_path, args, needle):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 64)
    text = Path(__file__).parent / "data" / "genesis.txt"
    args = [a.format(tmp=tmp_path, binary=binary, text=text) for a in args]
    r = seekwen(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]


def test_think_part_is_shown_apart():
    out: list[str] = []
    s = ThinkSplitter(out.append, tty=False)
    for piece in ["<thi", "nk>plan ", "this\nnow</th", "ink>\n\nThe ", "answer."]:
        s.push(piece)
    s.close()
    text = "".join(out)
    assert "think> plan this\nthink> now" in text
    assert s.answer == "The answer."
    starts_thinking = ThinkSplitter(out.append, tty=False, thinking=True)
    starts_thinking.push("hmm</think>Yes")
    starts_thinking.close()
    assert starts_thinking.answer == "Yes"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA present: the bench would run")
def test_bench_on_missing_cuda_is_one_line_error():
    r = seekwen("bench", "--device", "cuda")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0], r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["qwen2", "deepseek_v2"])
def test_bench_on_a_checkpoint_against_transformers(tmp_path, spec):
    """`seekwen bench --model F --vs-hf` runs every section on a tiny checkpoint and prints same-run ratios
    and a KV-cache size equal to the formula (the figures themselves are not checked: no timing asserts)."""
    from hf_models import SPECS, make_checkpoint

    folder = make_checkpoint(SPECS[spec], tmp_path)[1]
    r = seekwen("bench", "--model", str(folder), "--vs-hf", "--prefill-len", "12", "--prompt-lens", "6",
                "--batch-sizes", "2", "--contexts", "8", "--decode-tokens", "2", "--repeats", "1", timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "KV cache:" in out and "OK" in out and "MISMATCH" not in out
    for label in ("prefill 12 tokens", "decode batch 1, 6-token prompt", "decode batch 2", "context     8"):
        assert label in out, out
    assert out.count("x transformers") >= 4


@pytest.mark.slow
@needs_bundled
def test_generate_imports_no_plotting_or_table_libraries():
    """matplotlib and rich are imported only inside the functions that plot or print tables: neither
    `import seekwen`, nor building every command's parser, nor a whole `seekwen generate` loads them."""
    code = (
        "import sys\nfrom seekwen.cli import main\n"
        "assert main(['generate', '--quiet', '-n', '2', 'In the beginning']) == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'rich'}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout


@needs_bundled
def test_bench_speculative_section_reports_acceptance_and_checks_the_output():
    """`seekwen bench --sections speculative`: paired plain / n-gram decode on the bundled model, the output
    checked equal, acceptance per position and tokens per forward printed (figures not asserted)."""
    from seekwen.runtime.load import bundled_model_path

    r = seekwen("bench", "--model", str(bundled_model_path()), "--sections", "speculative",
                "--decode-tokens", "3", "--repeats", "1", "--spec-k", "2", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "decode b1, speculative ngram k=2" in r.stdout and "same tokens" in r.stdout, r.stdout
    assert "acceptance per position [" in r.stdout and "tokens per target forward" in r.stdout

"""`serve` and `bench` under `torchrun --nproc-per-node 2` (tensor parallel, gloo) on the bundled model.

- serve (loopback port), on the row pool and with --paged: rank 0 serves HTTP and rank 1 follows its
  engine (`server.loop.follow`). The official `openai` client gets the same greedy text as from the
  one-process server (completions, chat, streaming, several requests batched together, echo with prompt
  logprobs: a model call every rank runs), and SIGTERM to torchrun ends both ranks cleanly (rank 1 on
  rank 0's "stop");
- bench: rank 0 prints the report once, with a per-rank table whose model bytes are about half the
  one-process model's.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys

import pytest
from serve_util import ServerProcess, free_port

import seekwen
from seekwen.tools.bench.report import model_bytes
from seekwen.tools.common import bundled_model_path

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not (bundled_model_path() / "model.safetensors").is_file(),
                                reason="bundled model not built")

GREEDY = dict(temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the meek"]


class TorchrunServer(ServerProcess):
    """`seekwen serve` under torchrun with 2 ranks (gloo on CPU)."""

    def __init__(self, *args: str, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "seekwen",
               "serve", *args, "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log",
               "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEKWEN_DIST_TIMEOUT": "120"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)


def answers(url: str) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    out: dict = {}
    out["completion"] = client.completions.create(model="kjv", prompt=PROMPTS[0], **GREEDY).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # joined into one batch by the engine
        out["batched"] = list(pool.map(
            lambda p: client.completions.create(model="kjv", prompt=p, **GREEDY).choices[0].text, PROMPTS))
    chat = [{"role": "user", "content": "Who made the heaven and the earth?"}]
    out["chat"] = client.chat.completions.create(model="kjv", messages=chat, **GREEDY).choices[0].message.content
    stream = client.chat.completions.create(model="kjv", messages=chat, stream=True, **GREEDY)
    out["chat_stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    echo = client.completions.create(model="kjv", prompt=PROMPTS[1], echo=True, logprobs=2, max_tokens=4,
                                     temperature=0)
    out["echo"] = (echo.choices[0].text, [round(x, 4) if x is not None else None
                                          for x in echo.choices[0].logprobs.token_logprobs])
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The one-process server's answers (row pool)."""
    log = tmp_path_factory.mktemp("one") / "one.log"
    one = ServerProcess("--served-model-name", "kjv", log=log).wait_ready()
    try:
        return answers(one.url)
    finally:
        assert one.terminate() == 0, one.output()


@pytest.mark.parametrize("runtime", ["rows", "paged"])
def test_torchrun_server_equals_one_process(tmp_path, one_process, runtime):
    want = one_process
    extra = ["--paged"] if runtime == "paged" else ["--engine", "rows"]
    two = TorchrunServer("--served-model-name", "kjv", "--max-batch", "4", *extra, log=tmp_path / "tp.log")
    try:
        two.wait_ready(timeout=400)
        got = answers(two.url)
    finally:
        code = two.terminate(timeout=120)
    log = (tmp_path / "tp.log").read_text()
    assert got == want
    # torchrun forwards SIGTERM to both ranks and itself exits 1 (it re-raises the signal); rank 0 drains
    # and says stop, rank 1 leaves its loop on that message (not killed, no traceback)
    assert "seekwen serve: rank 1: rank 0 stopped serving; exiting" in log, log[-4000:]
    assert log.count("Traceback") <= 1 and "exitcode" not in log, log[-4000:]  # torchrun's own, if any
    assert code in (0, 1), log[-4000:]
    assert want["chat"] == want["chat_stream"] and len(set(want["batched"])) > 1


def test_torchrun_bench_per_rank_table(tmp_path):
    model = str(bundled_model_path())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "seekwen",
           "bench", "--model", model, "--sections", "prefill,decode,batch", "--prefill-len", "16", "--prompt-lens",
           "8", "--batch-sizes", "4", "--decode-tokens", "3", "--repeats", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("per rank (tp=2 ep=1, gloo; RSS):") == 1, p.stdout  # rank 0 prints, once
    assert p.stdout.count("decode batch 1, 8-token prompt") == 1
    rows = re.findall(r"^ {4}([01]) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) tok/s +([\d.]+) tok/s +([\d.]+) tok/s$",
                      p.stdout, re.M)
    assert [r[0] for r in rows] == ["0", "1"], p.stdout
    one = model_bytes(seekwen.load(model, dtype="float32")) / 1e6  # one process, fast path prepared
    for r in rows:
        assert 0.4 * one < float(r[1]) < 0.6 * one, (r, one)  # half, plus the replicated norms, router, latent
        assert all(float(x) > 0 for x in r[4:]), r

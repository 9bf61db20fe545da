"""The engine thread on its own: the queue bound, abort, and a failing step that fails only the sequences it
was running (the thread keeps serving)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hf_models import SPECS, make_checkpoint

import seekwen
from seekwen.runtime.engine import Engine, Event, SamplingParams

pytest.importorskip("fastapi")
from seekwen.server.loop import EngineLoop, QueueFull, Sequence  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, folder = make_checkpoint(SPECS["qwen2"], tmp_path_factory.mktemp("qwen2"))
    return seekwen.load(folder, dtype=torch.float32)


async def drain(out: asyncio.Queue, n: int, timeout: float = 60) -> dict[int, list]:
    got: dict[int, list] = {}
    done = 0
    while done < n:
        idx, item = await asyncio.wait_for(out.get(), timeout)
        got.setdefault(idx, []).append(item)
        if not isinstance(item, Event) or item.finished:
            done += 1
    return got


def test_queue_abort_and_failing_step(model):
    engine = Engine(model, max_batch=2, max_len=32)
    loop = EngineLoop(engine, max_queue=3)

    async def main():
        aloop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def seqs(n, max_tokens=6):
            return [Sequence(i, [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=True), out, aloop)
                    for i in range(n)]

        with pytest.raises(QueueFull):  # nothing drains before start: 3 fit, a 4th does not
            first = seqs(3)
            loop.submit(first)
            loop.submit(seqs(1))
        loop.start()
        got = await drain(out, 3)
        assert all(len(v) == 6 and v[-1].reason == "length" for v in got.values())
        assert loop.waiting == 0 and engine.stats.running == 0 and not engine.finished
        # abort a long one mid-way: its row is freed, it ends with ("abort", None)
        long = seqs(1, max_tokens=25)
        loop.submit(long)
        first_item = await asyncio.wait_for(out.get(), 30)
        assert isinstance(first_item[1], Event)
        loop.abort(long)
        while True:
            _, item = await asyncio.wait_for(out.get(), 30)
            if not isinstance(item, Event):
                assert item[0] == "abort"
                break
        assert engine.stats.running == 0 and engine.stats.finished.get("abort") == 1
        # a step that raises fails the running sequences only; the next request is served
        real = engine.step
        calls = {"n": 0}

        def flaky():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real()

        engine.step = flaky
        bad = seqs(2)
        loop.submit(bad)
        got = await drain(out, 2)
        assert all(v[-1] == ("error", "internal error while generating") for v in got.values())
        assert loop.step_errors == 1 and loop.waiting == 0
        good = seqs(1)
        loop.submit(good)
        got = await drain(out, 1)
        assert len(got[0]) == 6 and got[0][-1].reason == "length"
        loop.stop()
        assert not loop.thread.is_alive()

    asyncio.run(main())

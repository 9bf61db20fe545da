"""The engine thread: one thread owns the `Engine` and steps it while there is work (continuous batching:
requests join and leave between steps); the asyncio side talks to it only through a command queue.

- `submit(seqs)` queues sequences (refused with `QueueFull` beyond `max_queue` not yet running);
- `abort(seqs)` ends them at once (the engine frees their rows before its next step);
- each sequence gets its events (`Event`, or `("abort" | "error", message)`) on its asyncio queue, posted
  with one `call_soon_threadsafe` per step for all the events of that step.

A step that raises fails the sequences it was running (they get an error), never the thread: the next
requests are served normally.

Under torchrun (a tensor/expert-parallel model) rank 0 serves HTTP and every other rank runs `follow`: an
identical engine fed, before each of rank 0's steps, with a broadcast of what rank 0 applied since the last
one (requests added with their ids and sampling parameters, aborts, prompt-logprob calls, a reset after a
failed step) and whether it steps now. The engines then make the same plan and run the same forwards (the
sampled tokens are rank 0's: `Decoder.agree`); an idle rank 0 sends an empty message every second, so the
followers never reach the collective timeout; stopping rank 0 sends "stop" and ends every follower.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import threading
import traceback
from dataclasses import dataclass, field

from ..parallel.comm import Comm, env_world_size
from ..runtime.engine import Engine, Event, SamplingParams

log = logging.getLogger("seekwen.serve")


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Sequence:
    """One engine request as the server sees it: `index` is its choice index in the response."""

    index: int
    prompt: list[int]
    params: SamplingParams
    out: asyncio.Queue
    aloop: asyncio.AbstractEventLoop
    rid: int | None = None
    admitted: bool = False  # prefilled (has its first token)
    done: bool = False  # set in the engine thread when its last item is posted
    tokens: list[int] = field(default_factory=list)


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, Sequence] = {}  # engine request id -> sequence
        self._queued = 0  # submitted, not yet admitted
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.step_errors = 0
        self.thread = threading.Thread(target=self._run, name="seekwen-engine", daemon=True)
        # under torchrun: rank 0's plan, broadcast to the followers before each step (see `follow`)
        self._comm = Comm() if env_world_size() > 1 else None
        self._ops: list = []

    # ---- asyncio side -------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    @property
    def waiting(self) -> int:
        return self._queued

    def submit(self, seqs: list[Sequence]) -> None:
        with self._lock:
            if self._queued + len(seqs) > self.max_queue:
                raise QueueFull(self._queued)
            self._queued += len(seqs)
        self._cmds.put(("add", seqs))

    def call(self, fn) -> asyncio.Future:
        """Run `fn()` in the engine thread between two steps (it may use the model); its result comes back on
        the returned future."""
        aloop = asyncio.get_running_loop()
        fut = aloop.create_future()
        self._cmds.put(("call", (fn, fut, aloop)))
        return fut

    def call_model(self, name: str, *args) -> asyncio.Future:
        """`MODEL_CALLS[name](model, *args)` in the engine thread (under torchrun every rank runs it: it may
        run the parallel model's collectives; a plain `call` must not use the model there)."""
        fn = MODEL_CALLS[name]
        if self._comm is None:
            return self.call(lambda: fn(self.engine.model, *args))

        def run():
            self._ops.append(["call", name, list(args)])
            self._send(step=False)  # the followers run it with rank 0, before anything else
            return fn(self.engine.model, *args)

        return self.call(run)

    def abort(self, seqs: list[Sequence]) -> None:
        seqs = [s for s in seqs if not s.done]
        if seqs:
            self._cmds.put(("abort", seqs))

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(("wake", None))
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---- engine thread ------------------------------------------------------------------------------

    def _unqueue(self, seq: Sequence) -> None:
        if not seq.admitted:
            seq.admitted = True
            with self._lock:
                self._queued -= 1

    def _finish(self, seq: Sequence, item, posts: list) -> None:
        self._unqueue(seq)
        seq.done = True
        if seq.rid is not None:
            self._live.pop(seq.rid, None)
            self.engine.finished.pop(seq.rid, None)
        posts.append((seq, item))

    def _command(self, cmd, posts: list) -> None:
        kind, seqs = cmd
        if kind == "call":
            fn, fut, aloop = seqs
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e

            def done(fut=fut, result=result, error=error):
                if not fut.done():
                    fut.set_exception(error) if error is not None else fut.set_result(result)

            try:
                aloop.call_soon_threadsafe(done)
            except RuntimeError:
                pass
            return
        if kind == "add":
            for seq in seqs:
                try:
                    seq.rid = self.engine.add_request(seq.prompt, seq.params)
                except Exception as e:  # validated before; an engine refusal still only fails this request
                    self._finish(seq, ("error", str(e)), posts)
                    continue
                self._live[seq.rid] = seq
                self._ops.append(["add", seq.rid, seq.prompt, dataclasses.asdict(seq.params)])
        elif kind == "abort":
            for seq in seqs:
                if seq.done:
                    continue
                if seq.rid is not None:
                    self.engine.abort(seq.rid)
                    self._ops.append(["abort", seq.rid])
                self._finish(seq, ("abort", None), posts)

    def _fail_all(self, message: str, posts: list) -> None:
        rids = [seq.rid for seq in self._live.values()]
        for seq in list(self._live.values()):
            self._finish(seq, ("error", message), posts)
        reset(self.engine, rids)
        self._ops.append(["reset", rids])

    def _send(self, step: bool) -> None:
        """Under torchrun: the ops applied since the last message, and whether rank 0 steps now."""
        if self._comm is not None:
            self._comm.broadcast_object(json.dumps({"ops": self._ops, "step": step}))
        self._ops = []

    def _post(self, posts: list) -> None:
        if not posts:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in posts:
            by_loop.setdefault(seq.aloop, []).append((seq, item))
        for aloop, items in by_loop.items():
            try:
                aloop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed (shutting down)
                pass

    def _run(self) -> None:
        while True:
            posts: list = []
            busy = self.engine.has_work()
            try:  # idle: wait for a command (stop() sends one too)
                cmd = self._cmds.get_nowait() if busy else self._cmds.get(timeout=1.0)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] != "wake":
                    self._command(cmd, posts)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stop.is_set():
                for seq in list(self._live.values()):
                    self.engine.abort(seq.rid)
                    self._finish(seq, ("abort", "the server is shutting down"), posts)
                self._post(posts)
                self._ops = [["stop"]]
                self._send(step=False)
                return
            self._send(step=self.engine.has_work())
            if self.engine.has_work():
                try:
                    events = self.engine.step()
                except Exception:
                    self.step_errors += 1
                    log.error("engine step failed; failing its requests\n%s", traceback.format_exc())
                    self._fail_all("internal error while generating", posts)
                    events = []
                for ev in events:
                    seq = self._live.get(ev.id)
                    if seq is None:
                        continue
                    if ev.finished:
                        self._finish(seq, ev, posts)
                    else:
                        self._unqueue(seq)
                        posts.append((seq, ev))
            self._post(posts)


def reset(engine: Engine, rids: list[int]) -> None:
    """After a failed step: abort `rids` and drop whatever the engine still holds."""
    for rid in rids:
        try:
            engine.abort(rid)
        except Exception:
            pass
    engine.live.clear()
    engine.waiting.clear()
    engine.finished.clear()
    engine._gauges()


class OutOfStep(RuntimeError):
    """A follower's engine no longer matches rank 0's (it would run other forwards)."""


def follow(engine: Engine, comm: Comm | None = None) -> None:
    """A follower rank of `seekwen serve` under torchrun: apply rank 0's broadcast ops to this rank's
    engine and step with it, until rank 0 says "stop". A step that fails here ends the follower (and so
    the job): its engine could no longer keep in step with rank 0's."""
    comm = comm or Comm()
    while True:
        msg = json.loads(comm.broadcast_object(None))
        for op in msg["ops"]:
            if op[0] == "stop":
                return
            _apply(engine, op)
        if msg["step"]:
            if not engine.has_work():
                raise OutOfStep(f"rank {comm.rank}: rank 0 steps its engine, this rank's has no work")
            engine.step()
            engine.finished.clear()  # rank 0 reports the results; nothing reads them here


def _apply(engine: Engine, op: list) -> None:
    kind = op[0]
    if kind == "add":
        rid, prompt, params = op[1:]
        got = engine.add_request(prompt, SamplingParams(**params))
        if got != rid:
            raise OutOfStep(f"request id {got} here, {rid} on rank 0")
    elif kind == "abort":
        engine.abort(op[1])
    elif kind == "reset":
        reset(engine, op[1])
    elif kind == "call":
        MODEL_CALLS[op[1]](engine.model, *op[2])
    else:
        raise OutOfStep(f"unknown op {kind!r} from rank 0")


def _deliver(items: list[tuple[Sequence, Event | tuple]]) -> None:
    for seq, item in items:
        seq.out.put_nowait((seq.index, item))


def prompt_logprobs(model, ids: list[int], k: int) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
    """Each prompt token's logprob given the tokens before it, and the k most likely tokens there (the first
    token has none): one forward over the prompt, no cache, in chunks of positions for the log-softmax."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        logits = model(x)[0]  # [S, V]
        out: list = [(ids[0], None, None)]
        for start in range(0, len(ids) - 1, 256):
            stop = min(start + 256, len(ids) - 1)
            lp = logits[start:stop].float().log_softmax(-1)
            nxt = x[0, start + 1 : stop + 1]
            chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
            top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            for j, t in enumerate(nxt.tolist()):
                out.append((t, chosen[j], list(zip(top_i[j].tolist(), top_v[j].tolist(), strict=True))))
    return out


# what `EngineLoop.call_model` may run: every rank runs the same function on its model
MODEL_CALLS = {"prompt_logprobs": prompt_logprobs}

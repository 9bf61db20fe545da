"""Load test for `seekwen serve` (not a test of the suite): requests/s, output tokens/s, time to first token
and inter-token latency percentiles at several concurrency levels, with streaming completions.

    python scripts/load_test.py --serve                       # starts the bundled model on a free loopback port
    python scripts/load_test.py --serve MODEL --max-batch 16  # another checkpoint
    python scripts/load_test.py --url http://127.0.0.1:8000   # a server that is already running

Only loopback addresses are accepted. Every level sends a bounded number of requests (--requests, default
2 x concurrency, at least 8) with --max-tokens tokens each (EOS ignored, so every request generates exactly
that many), greedy unless --temperature says otherwise; each request has a timeout and each level a deadline.
TTFT is measured from sending the request to the first streamed token; inter-token latency is the gap
between consecutive streamed chunks of one request (one token each, except where a multi-byte character
spans tokens). The HTTP client is a small asyncio one (no dependency), one connection per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the poor in spirit",
           "And it came to pass", "Thus saith the LORD", "For God so loved the world", "Let there be light"]


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def stream_request(host: str, port: int, body: dict, api_key: str | None, timeout: float) -> dict:
    """One streaming completion: {"ttft", "gaps", "tokens", "ok", "error"}."""
    t0 = time.perf_counter()
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nAccept: text/event-stream\r\nConnection: close\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    out = {"ttft": None, "gaps": [], "tokens": 0, "ok": False, "error": None}
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(head.encode() + b"\r\n" + data)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout)
        code = int(status.split()[1])
        chunked = False
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        if code != 200:
            out["error"] = f"HTTP {code}"
            return out
        buf, last = b"", None
        while True:
            if chunked:
                size = int((await asyncio.wait_for(reader.readline(), timeout)).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                piece = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
                buf += piece[:-2]
            else:
                piece = await asyncio.wait_for(reader.read(65536), timeout)
                if not piece:
                    break
                buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if payload == b"[DONE]":
                    out["ok"] = out["error"] is None
                    return out
                msg = json.loads(payload)
                if "error" in msg:
                    out["error"] = msg["error"].get("message")
                    continue
                if msg.get("usage"):
                    out["tokens"] = msg["usage"]["completion_tokens"]
                if msg.get("choices"):
                    now = time.perf_counter()
                    if out["ttft"] is None:
                        out["ttft"] = now - t0
                    else:
                        out["gaps"].append(now - last)
                    last = now
        return out
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run_level(host, port, model, concurrency, n_requests, args) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(i):
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True, "seed": i, **({"logprobs": args.logprobs} if args.logprobs is not None else {})}
        async with sem:
            try:
                results.append(await stream_request(host, port, body, args.api_key, args.timeout))
            except (TimeoutError, OSError, ValueError) as e:
                results.append({"ok": False, "error": repr(e), "ttft": None, "gaps": [], "tokens": 0})

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n_requests))), args.level_deadline)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": n_requests, "ok": len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "out_tok_per_s": tokens / wall,
            "ttft_ms": {p: 1000 * percentile(ttft, p) for p in (50, 90, 99)},
            "itl_ms": {p: 1000 * percentile(gaps, p) for p in (50, 90, 99)},
            "itl_mean_ms": 1000 * statistics.fmean(gaps) if gaps else float("nan"),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3]}


def get_json(url: str, api_key: str | None) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def start_server(model: str | None, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "seekwen", "serve", *([model] if model else []), "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", "1024", "--no-access-log",
           "--log-level", "warning", *(["--threads", str(args.threads)] if args.threads else []),
           *args.server_args.split()]
    proc = subprocess.Popen(cmd, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not become ready in 300 s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="a running server (loopback only), e.g. http://127.0.0.1:8000")
    ap.add_argument("--serve", nargs="?", const="", default=None, metavar="MODEL",
                    help="start `seekwen serve [MODEL]` on a free loopback port for the run (default model: bundled)")
    ap.add_argument("--max-batch", type=int, default=8, help="--max-batch of the server started by --serve")
    ap.add_argument("--threads", type=int, default=None, help="--threads of the server started by --serve")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (default: 1,4,16,64)")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 x level, >= 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--logprobs", type=int, default=None,
                    help="ask for logprobs (0: the chosen token's): a chunk per token even where a token adds no "
                         "text, e.g. a random-weight model whose ids fall outside the tokenizer's vocabulary")
    ap.add_argument("--server-args", default="", help="more arguments for --serve, e.g. '--max-model-len 512'")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per read of one request")
    ap.add_argument("--level-deadline", type=float, default=900.0, help="seconds per concurrency level at most")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if any(c < 1 or c > 256 for c in levels):
        raise SystemExit("--concurrency levels must be in [1, 256]")
    proc = None
    if args.serve is not None:
        proc, url = start_server(args.serve or None, args)
    elif args.url:
        url = args.url
    else:
        raise SystemExit("give --url or --serve")
    try:
        u = urlsplit(url)
        if not loopback(u.hostname or ""):
            raise SystemExit(f"{u.hostname}: only loopback addresses (127.0.0.0/8, ::1, localhost) are load-tested")
        models = get_json(url + "/v1/models", args.api_key)
        model = models["data"][0]["id"]
        # warm-up (first-use costs: kernels, caches), not measured
        asyncio.run(run_level(u.hostname, u.port, model, 2, 2, args))
        rows = []
        for c in levels:
            n = args.requests or max(8, 2 * c)
            row = asyncio.run(run_level(u.hostname, u.port, model, c, n, args))
            rows.append(row)
            print(f"concurrency {c:>3}: {row['ok']}/{n} ok in {row['wall_s']:.1f}s  {row['req_per_s']:.2f} req/s  "
                  f"{row['out_tok_per_s']:.0f} out tok/s  TTFT p50/p90/p99 {row['ttft_ms'][50]:.0f}/"
                  f"{row['ttft_ms'][90]:.0f}/{row['ttft_ms'][99]:.0f} ms  ITL p50/p90/p99 {row['itl_ms'][50]:.1f}/"
                  f"{row['itl_ms'][90]:.1f}/{row['itl_ms'][99]:.1f} ms"
                  + (f"  errors: {row['errors']}" if row["errors"] else ""), flush=True)
        print("\n| concurrency | requests | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) "
              "| ITL p50 / p90 / p99 (ms) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['concurrency']} | {r['ok']}/{r['requests']} | {r['req_per_s']:.2f} | "
                  f"{r['out_tok_per_s']:.0f} | "
                  f"{r['ttft_ms'][50]:.0f} / {r['ttft_ms'][90]:.0f} / {r['ttft_ms'][99]:.0f} | "
                  f"{r['itl_ms'][50]:.1f} / {r['itl_ms'][90]:.1f} / {r['itl_ms'][99]:.1f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"url": url, "model": model, "max_tokens": args.max_tokens, "rows": rows}, f, indent=2)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus text exposition (format 0.0.4) of the engine's statistics and the server's own counters.
Names follow vLLM's (with a `seekwen_` prefix). The prefix-cache hit rate is there when the engine has
one (`--paged`)."""

from __future__ import annotations

from collections import Counter

from ..runtime.stats import EngineStats, Histogram


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


class Writer:
    def __init__(self, base: dict[str, str]):
        self.base = base
        self.lines: list[str] = []

    def head(self, name: str, kind: str, help_: str) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels({**self.base, **labels})} {_num(value)}")

    def metric(self, name: str, kind: str, help_: str, value: float) -> None:
        self.head(name, kind, help_)
        self.sample(name, value)

    def histogram(self, name: str, help_: str, h: Histogram) -> None:
        self.head(name, "histogram", help_)
        for bound, count in h.cumulative():
            self.sample(f"{name}_bucket", count, le=_num(bound))
        self.sample(f"{name}_sum", h.sum)
        self.sample(f"{name}_count", h.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(model_name: str, stats: EngineStats | None, waiting: int, http: Counter, ready: bool) -> str:
    w = Writer({"model_name": model_name})
    w.metric("seekwen_model_ready", "gauge", "1 once the model is loaded and the server takes requests.", int(ready))
    st = stats or EngineStats()
    w.metric("seekwen_num_requests_running", "gauge", "Sequences in the running batch (holding a KV-cache row).",
             st.running)
    w.metric("seekwen_num_requests_waiting", "gauge", "Sequences queued, not yet prefilled.", waiting)
    w.metric("seekwen_kv_cache_usage_perc", "gauge", "Fraction of the KV cache's token slots held (1 = full).",
             round(st.cache_usage, 6))
    w.metric("seekwen_kv_cache_tokens", "gauge", "Tokens held in the KV cache.", st.cache_tokens)
    w.metric("seekwen_kv_cache_capacity_tokens", "gauge", "Tokens the KV cache can hold (rows x max length).",
             st.cache_capacity)
    if st.prefix_hit_rate is not None:  # only an engine with a prefix cache (--paged) has one
        w.metric("seekwen_prefix_cache_hit_rate", "gauge", "Fraction of prompt tokens served from the prefix cache.",
                 round(st.prefix_hit_rate, 6))
    if st.spec_drafts is not None:  # only an engine that speculates (--speculative)
        w.metric("seekwen_spec_decode_num_draft_tokens_total", "counter", "Tokens drafted by the proposer.",
                 st.spec_drafts)
        w.metric("seekwen_spec_decode_num_accepted_tokens_total", "counter",
                 "Drafted tokens the target model accepted.", st.spec_accepted)
    w.metric("seekwen_prompt_tokens_total", "counter", "Prompt tokens prefilled.", st.prompt_tokens)
    w.metric("seekwen_generation_tokens_total", "counter", "Tokens generated.", st.generation_tokens)
    w.metric("seekwen_engine_steps_total", "counter", "Engine steps (one batched forward each).", st.steps)
    w.head("seekwen_request_success_total", "counter", "Sequences finished, by reason (stop, length, abort).")
    for reason, n in sorted({"stop": 0, "length": 0, "abort": 0, **_reasons(st.finished)}.items()):
        w.sample("seekwen_request_success_total", n, finished_reason=reason)
    w.histogram("seekwen_time_to_first_token_seconds", "Time from a sequence's arrival at the engine to its "
                "first token.", st.ttft)
    w.histogram("seekwen_inter_token_latency_seconds", "Time between a sequence's consecutive tokens.", st.itl)
    w.histogram("seekwen_e2e_request_latency_seconds", "Time from a sequence's arrival to its last token.", st.e2e)
    w.histogram("seekwen_iteration_tokens_total", "Tokens computed per engine step (prefill + decode).",
                st.step_tokens)
    w.head("seekwen_http_requests_total", "counter", "HTTP responses by status code.")
    for code, n in sorted(http.items()):
        w.sample("seekwen_http_requests_total", n, code=str(code))
    return w.text()


def _reasons(finished: dict[str, int]) -> dict[str, int]:
    """Engine reasons -> OpenAI's finish reasons (an EOS is a "stop")."""
    out: dict[str, int] = {}
    for reason, n in finished.items():
        key = "stop" if reason == "eos" else reason
        out[key] = out.get(key, 0) + n
    return out

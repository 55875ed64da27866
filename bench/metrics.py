"""Per-request timings and the latency and throughput summary every system gets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """When one request was sent and when each of its output tokens arrived (seconds)."""

    num_prompt_tokens: int
    sent_s: float
    token_times_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times_s)

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.sent_s

    @property
    def e2e_s(self) -> float:
        return self.token_times_s[-1] - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for one-token outputs."""
        if self.num_output_tokens < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.num_output_tokens - 1)

    def add_tokens(self, num_tokens: int, now_s: float) -> None:
        """Tokens that arrived together; the gap since the last arrival is spread over them."""
        last = self.token_times_s[-1] if self.token_times_s else None
        if last is None:
            self.token_times_s.append(now_s)
            last, num_tokens = now_s, num_tokens - 1
        step = (now_s - last) / num_tokens if num_tokens else 0.0
        self.token_times_s.extend(last + step * (i + 1) for i in range(num_tokens))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict[str, float]:
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else math.nan
    return out


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, object]:
    """Throughput over `duration_s` and latency distributions over the completed requests."""
    done = [r for r in records if r.ok]
    num_output = sum(r.num_output_tokens for r in done)
    num_prompt = sum(r.num_prompt_tokens for r in done)
    itl = [b - a for r in done for a, b in zip(r.token_times_s, r.token_times_s[1:], strict=False)]
    return {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "duration_s": duration_s,
        "num_prompt_tokens": num_prompt,
        "num_output_tokens": num_output,
        "request_throughput_per_s": len(done) / duration_s,
        "output_tokens_per_s": num_output / duration_s,
        "total_tokens_per_s": (num_prompt + num_output) / duration_s,
        "ttft_s": distribution([r.ttft_s for r in done]),
        "tpot_s": distribution([t for r in done if (t := r.tpot_s) is not None]),
        "itl_s": distribution(itl),
        "e2e_s": distribution([r.e2e_s for r in done]),
    }

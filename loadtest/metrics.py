"""The arithmetic of a load test: per-request records in, percentiles, throughput, SLO attainment out.

Everything here is computed from exact per-request records (one JSON line per request, written by the
Locust process), never from Locust's histograms, which round response times to 2 significant digits.

Definitions (the ones vLLM's benchmarks use, so numbers compare across tools):
- TTFT: request sent -> first chunk carrying generated text.
- ITL: time between consecutive text-carrying chunks of one request (one sample per gap).
- TPOT: (E2E - TTFT) / (n - 1), n = output tokens (from `usage`); undefined for n <= 1.
- E2E: request sent -> end of stream.
- Throughput and goodput divide by the measurement window: first request sent -> last request finished.
- SLO attainment: the share of all requests (failed ones count as misses) with TTFT <= slo_ttft and
  TPOT <= slo_tpot; a limit that is not given is always met. Goodput counts only those requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class RequestRecord:
    """One request, as the Locust user saw it. Times are seconds; `start_time` is epoch (time.time())."""

    request_id: str
    endpoint: str  # "completions" | "chat"
    start_time: float
    e2e_s: float
    ttft_s: float | None  # None when no token arrived
    token_times_s: tuple[float, ...] = ()  # arrival of each text chunk, relative to start; [0] == ttft_s
    num_prompt_tokens: int | None = None  # from usage; None when the server did not report it
    num_output_tokens: int = 0  # from usage, else the number of text chunks
    num_requested_output_tokens: int = 0
    is_usage_reported: bool = False
    error: str | None = None
    status_code: int | None = None
    pool: str = "main"  # which workload pool it came from (e.g. "burst" for long-context bursts)
    session_id: str = ""
    turn: int = 0

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def end_time(self) -> float:
        return self.start_time + self.e2e_s

    @property
    def itl_s(self) -> tuple[float, ...]:
        times = self.token_times_s
        return tuple(later - earlier for earlier, later in zip(times, times[1:], strict=False))

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.num_output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> RequestRecord:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["token_times_s"] = tuple(values.get("token_times_s") or ())
        return cls(**values)


def read_records(path) -> list[RequestRecord]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                records.append(RequestRecord.from_dict(json.loads(line)))
    return records


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds. All None when there were no samples."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of_seconds(cls, samples_s: Sequence[float]) -> LatencyStats:
        if not samples_s:
            return cls(count=0)
        samples_ms = [sample * 1000.0 for sample in samples_s]
        return cls(
            count=len(samples_ms),
            mean=sum(samples_ms) / len(samples_ms),
            p50=percentile(samples_ms, 50),
            p90=percentile(samples_ms, 90),
            p99=percentile(samples_ms, 99),
            max=max(samples_ms),
        )


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def is_met_by(self, record: RequestRecord) -> bool:
        if not record.is_ok:
            return False
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000.0 > self.ttft_ms):
            return False
        tpot = record.tpot_s
        # A one-token answer has no TPOT to miss.
        return not (self.tpot_ms is not None and tpot is not None and tpot * 1000.0 > self.tpot_ms)


@dataclass(frozen=True)
class Summary:
    label: str
    scenario: str
    window_s: float
    num_requests: int
    num_ok: int
    num_errors: int
    error_rate: float
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    # ok requests whose output length differs from what was asked: the server ignored ignore_eos/min_tokens
    num_output_length_mismatches: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo: Slo
    slo_attainment: float | None
    goodput_requests_per_s: float
    goodput_output_tokens_per_s: float
    errors: dict[str, int] = field(default_factory=dict)  # message -> count (first 200 characters)
    extra: dict = field(default_factory=dict)  # run metadata: host, model, users, duration, workload, ...

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> Summary:
        values = dict(data)
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            values[name] = LatencyStats(**values[name])
        values["slo"] = Slo(**values["slo"])
        return cls(**values)


def measurement_window(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.end_time for r in records) - min(r.start_time for r in records)


def summarize(
    records: Sequence[RequestRecord],
    slo: Slo = Slo(),
    label: str = "",
    scenario: str = "",
    window_s: float | None = None,
    extra: dict | None = None,
) -> Summary:
    window = measurement_window(records) if window_s is None else window_s
    ok = [r for r in records if r.is_ok]
    good = [r for r in records if slo.is_met_by(r)]

    def per_second(amount: float) -> float:
        return amount / window if window > 0 else 0.0

    prompt_counts = [r.num_prompt_tokens for r in ok if r.num_prompt_tokens is not None]
    errors: dict[str, int] = {}
    for record in records:
        if record.error is not None:
            key = record.error[:200]
            errors[key] = errors.get(key, 0) + 1
    return Summary(
        label=label,
        scenario=scenario,
        window_s=window,
        num_requests=len(records),
        num_ok=len(ok),
        num_errors=len(records) - len(ok),
        error_rate=(len(records) - len(ok)) / len(records) if records else 0.0,
        requests_per_s=per_second(len(ok)),
        output_tokens_per_s=per_second(sum(r.num_output_tokens for r in ok)),
        prompt_tokens_per_s=per_second(sum(prompt_counts)),
        mean_prompt_tokens=sum(prompt_counts) / len(prompt_counts) if prompt_counts else None,
        mean_output_tokens=sum(r.num_output_tokens for r in ok) / len(ok) if ok else None,
        num_output_length_mismatches=sum(
            1 for r in ok if r.num_requested_output_tokens and r.num_output_tokens != r.num_requested_output_tokens
        ),
        ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=LatencyStats.of_seconds([t for t in (r.tpot_s for r in ok) if t is not None]),
        itl_ms=LatencyStats.of_seconds([gap for r in ok for gap in r.itl_s]),
        e2e_ms=LatencyStats.of_seconds([r.e2e_s for r in ok]),
        slo=slo,
        slo_attainment=len(good) / len(records) if records else None,
        goodput_requests_per_s=per_second(len(good)),
        goodput_output_tokens_per_s=per_second(sum(r.num_output_tokens for r in good)),
        errors=errors,
        extra=dict(extra or {}),
    )


@dataclass(frozen=True)
class TimeBucket:
    """One interval [start_s, start_s + width) of a run, seconds relative to the run's origin."""

    start_s: float
    width_s: float
    num_finished: int  # ok requests that finished in the bucket
    num_errors: int  # failed requests that finished in the bucket
    num_output_tokens: float  # tokens that arrived in the bucket (a chunk's share of its request's count)
    num_in_flight: int  # requests running at the bucket's start
    ttft_ms: LatencyStats  # of requests that finished in the bucket
    tpot_ms: LatencyStats
    itl_ms: LatencyStats  # of gaps that ended in the bucket

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.width_s

    @property
    def requests_per_s(self) -> float:
        return self.num_finished / self.width_s


def time_series(records: Iterable[RequestRecord], bucket_s: float, origin: float | None = None) -> list[TimeBucket]:
    """Per-bucket throughput and latency percentiles, for the plots over time."""
    if bucket_s <= 0:
        raise ValueError("bucket_s must be positive")
    records = list(records)
    if not records:
        return []
    origin = min(r.start_time for r in records) if origin is None else origin
    # an event exactly at the end of the last bucket is counted in it (see index_of)
    num_buckets = max(1, math.ceil((max(r.end_time for r in records) - origin) / bucket_s))

    def index_of(time_s: float) -> int:
        return min(num_buckets - 1, max(0, int((time_s - origin) // bucket_s)))

    finished: list[list[RequestRecord]] = [[] for _ in range(num_buckets)]
    tokens = [0.0] * num_buckets
    gaps: list[list[float]] = [[] for _ in range(num_buckets)]
    for record in records:
        finished[index_of(record.end_time)].append(record)
        if not record.is_ok or not record.token_times_s:
            continue
        share = record.num_output_tokens / len(record.token_times_s)
        for offset in record.token_times_s:
            tokens[index_of(record.start_time + offset)] += share
        for offset, gap in zip(record.token_times_s[1:], record.itl_s, strict=True):
            gaps[index_of(record.start_time + offset)].append(gap)
    buckets = []
    for index in range(num_buckets):
        start = origin + index * bucket_s
        done = finished[index]
        ok = [r for r in done if r.is_ok]
        buckets.append(
            TimeBucket(
                start_s=index * bucket_s,
                width_s=bucket_s,
                num_finished=len(ok),
                num_errors=len(done) - len(ok),
                num_output_tokens=tokens[index],
                num_in_flight=sum(1 for r in records if r.start_time <= start < r.end_time),
                ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
                tpot_ms=LatencyStats.of_seconds([t for t in (r.tpot_s for r in ok) if t is not None]),
                itl_ms=LatencyStats.of_seconds(gaps[index]),
            )
        )
    return buckets

"""Request traces for the simulator: synthetic (diurnal, bursty, several models) or replayed from a file.

A trace is a tuple of `TraceRequest` sorted by arrival (seconds from the start of the trace). Files
(`load_trace`, the format told by the header):
- our own CSV (`arrival`, `prompt_tokens`, `output_tokens`, optional `model`) or JSONL with those keys;
- BurstGPT (github.com/HPMLL/BurstGPT): `Timestamp` (s), `Model`, `Request tokens`, `Response tokens`;
  rows with 0 response tokens (failed requests) are skipped;
- Azure LLM inference traces (github.com/Azure/AzurePublicDataset, AzureLLMInferenceTrace_{code,conv}
  2023/2024): `TIMESTAMP` (a date-time), `ContextTokens`, `GeneratedTokens`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

DAY_S = 86400.0


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    model: str = ""  # which deployment serves it ("" = the only one)

    def __post_init__(self) -> None:
        if self.arrival_s < 0 or self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"bad trace request {self}: arrival >= 0, prompt and output tokens >= 1")


@dataclass(frozen=True)
class DiurnalTrace:
    """Poisson arrivals whose rate follows the day, mean_rate * (1 + amplitude * cos(2 pi (hour - peak_hour)
    / period_hours)): the peak at `peak_hour`, the trough half a period away (tests shorten the period).
    Lengths are clipped log-normals with ShareGPT's long-tailed shape, scaled to a reasoning model's chat
    traffic: prompts like chat turns carrying their conversation (median 1K tokens, sigma 1.0), outputs
    with a long chain of thought (median 3K, sigma 0.7)."""

    hours: float = 24.0
    mean_rate_per_s: float = 1.0
    amplitude: float = 0.75  # peak / trough = (1 + a) / (1 - a) = 7
    peak_hour: float = 15.0
    period_hours: float = 24.0
    prompt_median: float = 1024
    prompt_sigma: float = 1.0
    prompt_range: tuple[int, int] = (16, 16384)
    output_median: float = 3072
    output_sigma: float = 0.7
    output_range: tuple[int, int] = (64, 16384)

    def __post_init__(self) -> None:
        if self.hours <= 0 or self.mean_rate_per_s <= 0 or self.period_hours <= 0:
            raise ValueError("hours, period_hours and mean_rate_per_s must be > 0")
        if not 0 <= self.amplitude < 1:
            raise ValueError("amplitude must be in [0, 1)")
        for low, high in (self.prompt_range, self.output_range):
            if not 1 <= low <= high:
                raise ValueError("length ranges must satisfy 1 <= low <= high")

    def rate_at(self, time_s: float) -> float:
        phase = 2 * math.pi * (time_s / 3600 - self.peak_hour) / self.period_hours
        return self.mean_rate_per_s * (1 + self.amplitude * math.cos(phase))

    def generate(self, seed: int) -> tuple[TraceRequest, ...]:
        """Arrivals by thinning a Poisson process at the peak rate; the same seed gives the same trace."""
        rng = np.random.default_rng(seed)
        duration = self.hours * 3600
        peak_rate = self.mean_rate_per_s * (1 + self.amplitude)
        count = rng.poisson(peak_rate * duration)
        times = np.sort(rng.uniform(0.0, duration, count))
        phase = 2 * np.pi * (times / 3600 - self.peak_hour) / self.period_hours
        keep = rng.uniform(0.0, 1.0, count) * peak_rate < self.mean_rate_per_s * (1 + self.amplitude * np.cos(phase))
        times = times[keep]
        prompts = _clipped_lognormal(rng, self.prompt_median, self.prompt_sigma, self.prompt_range, len(times))
        outputs = _clipped_lognormal(rng, self.output_median, self.output_sigma, self.output_range, len(times))
        return tuple(TraceRequest(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs, strict=True))


def _clipped_lognormal(rng: np.random.Generator, median: float, sigma: float, bounds: tuple[int, int],
                       size: int) -> np.ndarray:
    values = np.rint(rng.lognormal(math.log(median), sigma, size))
    return np.clip(values, bounds[0], bounds[1]).astype(np.int64)


def load_trace(path: str | Path) -> tuple[TraceRequest, ...]:
    """Reads a trace file: JSONL by extension (.jsonl/.json), else CSV in one of the formats above."""
    path = Path(path)
    with path.open(newline="") as handle:
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = list(csv.DictReader(handle))
    if not rows:
        return ()
    columns = set(rows[0])
    if {"Timestamp", "Request tokens", "Response tokens"} <= columns:  # BurstGPT
        requests = [TraceRequest(float(row["Timestamp"]), max(1, int(row["Request tokens"])),
                                 int(row["Response tokens"]), row.get("Model", "")) for row in rows
                    if int(row["Response tokens"]) > 0]
    elif {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= columns:  # Azure
        times = [datetime.fromisoformat(row["TIMESTAMP"].strip()[:26]) for row in rows]
        start = min(times)
        requests = [TraceRequest((when - start).total_seconds(), max(1, int(row["ContextTokens"])),
                                 max(1, int(row["GeneratedTokens"]))) for when, row in zip(times, rows, strict=True)]
    else:
        try:
            requests = [TraceRequest(float(row["arrival"]), int(row["prompt_tokens"]), int(row["output_tokens"]),
                                     row.get("model") or "") for row in rows]
        except KeyError as error:
            raise ValueError(f"{path}: not BurstGPT, Azure, or arrival/prompt_tokens/output_tokens "
                             f"(missing {error})") from None
    requests.sort(key=lambda request: request.arrival_s)
    start = requests[0].arrival_s if requests else 0.0
    return tuple(TraceRequest(r.arrival_s - start, r.prompt_tokens, r.output_tokens, r.model) for r in requests)


def write_trace(path: str | Path, trace: tuple[TraceRequest, ...]) -> None:
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("arrival", "prompt_tokens", "output_tokens", "model"))
        writer.writerows((f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens, r.model) for r in trace)


@dataclass(frozen=True)
class BurstyTrace:
    """Diurnal arrivals (`diurnal`) with bursts on top: burst episodes start as a Poisson process
    (`bursts_per_hour`), each lasting an exponential time (mean `burst_mean_s`) during which the rate is
    multiplied by `burst_factor` (BurstGPT's observation: short surges several times the base rate)."""

    diurnal: DiurnalTrace
    bursts_per_hour: float = 2.0
    burst_mean_s: float = 120.0
    burst_factor: float = 3.0

    def generate(self, seed: int) -> tuple[TraceRequest, ...]:
        rng = np.random.default_rng(seed + 7919)
        base = self.diurnal.generate(seed)
        duration = self.diurnal.hours * 3600
        extra_rate = self.diurnal.mean_rate_per_s * (self.burst_factor - 1)
        extra: list[TraceRequest] = []
        for start in np.sort(rng.uniform(0, duration, rng.poisson(self.bursts_per_hour * self.diurnal.hours))):
            length = rng.exponential(self.burst_mean_s)
            count = rng.poisson(extra_rate * self.diurnal.rate_at(start) / self.diurnal.mean_rate_per_s * length)
            times = np.sort(rng.uniform(start, min(duration, start + length), count))
            d = self.diurnal
            prompts = _clipped_lognormal(rng, d.prompt_median, d.prompt_sigma, d.prompt_range, count)
            outputs = _clipped_lognormal(rng, d.output_median, d.output_sigma, d.output_range, count)
            extra += [TraceRequest(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs, strict=True)]
        return tuple(sorted(base + tuple(extra), key=lambda r: r.arrival_s))


@dataclass(frozen=True)
class SpikeTrace:
    """KunServe's memory spike: Poisson arrivals at `base_rate_per_s`, `factor` times that for `spike_s` seconds
    from `spike_at_s`; clipped log-normal prompt and output lengths (medians, sigmas, ranges as below)."""

    seconds: float = 120.0
    base_rate_per_s: float = 0.3
    factor: float = 4.0
    spike_at_s: float = 30.0
    spike_s: float = 30.0
    prompt_median: float = 4096
    prompt_sigma: float = 0.6
    prompt_range: tuple[int, int] = (256, 16384)
    output_median: float = 2048
    output_sigma: float = 0.6
    output_range: tuple[int, int] = (16, 4096)

    def __post_init__(self) -> None:
        if min(self.seconds, self.base_rate_per_s, self.factor) <= 0 or self.spike_s < 0:
            raise ValueError("seconds, base_rate_per_s and factor must be > 0, spike_s >= 0")

    def in_spike(self, time_s: float) -> bool:
        return self.spike_at_s <= time_s < self.spike_at_s + self.spike_s

    def generate(self, seed: int) -> tuple[TraceRequest, ...]:
        """Arrivals by thinning a Poisson process at the spike's rate; the same seed gives the same trace."""
        rng = np.random.default_rng(seed)
        peak = self.base_rate_per_s * max(1.0, self.factor)
        times = np.sort(rng.uniform(0.0, self.seconds, rng.poisson(peak * self.seconds)))
        rate = np.where((times >= self.spike_at_s) & (times < self.spike_at_s + self.spike_s),
                        self.base_rate_per_s * self.factor, self.base_rate_per_s)
        times = times[rng.uniform(0.0, peak, len(times)) < rate]
        prompts = _clipped_lognormal(rng, self.prompt_median, self.prompt_sigma, self.prompt_range, len(times))
        outputs = _clipped_lognormal(rng, self.output_median, self.output_sigma, self.output_range, len(times))
        return tuple(TraceRequest(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs, strict=True))


def multi_model(traces: dict[str, tuple[TraceRequest, ...]]) -> tuple[TraceRequest, ...]:
    """One trace of several deployments' requests (each tagged with its model)."""
    merged = [TraceRequest(r.arrival_s, r.prompt_tokens, r.output_tokens, model) for model, trace in traces.items()
              for r in trace]
    return tuple(sorted(merged, key=lambda r: (r.arrival_s, r.model)))


def clip_to_context(trace: tuple[TraceRequest, ...], max_model_len: int) -> tuple[TraceRequest, ...]:
    """Requests as a server with `max_model_len` would take them: prompt and output shortened to fit."""
    result = []
    for request in trace:
        prompt = min(request.prompt_tokens, max_model_len - 1)
        output = min(request.output_tokens, max_model_len - prompt)
        result.append(TraceRequest(request.arrival_s, prompt, output, request.model))
    return tuple(result)

"""Small helpers for driving an LLMEngine to completion in tests."""

from __future__ import annotations

from collections.abc import Sequence

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.offload_policy import LayerwiseOffload
from engine.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
    "Translate to French: Good morning, how are you today? I hope the weather is nice where you are.",
    "1, 2, 3, 4,",
    "The most important thing about writing clean code is that it should be easy to read, easy to test and "
    "easy to change. In my experience, the best way to get there is",
    "Q: What is the boiling point of water at sea level?\nA:",
]


def tiny_engine(model_dir, tokenizer, **options) -> LLMEngine:
    """A small fp32 engine of two running requests over `model_dir` (tiny_llama_dir); `options` override."""
    config = dict(model=str(model_dir), dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=2,
                  max_num_batched_tokens=32, tokens_per_page=16, device_memory_bytes=256 << 20)
    return LLMEngine(EngineConfig(**(config | options)), tokenizer=tokenizer)


class Fault:
    """Makes the scheduler raise while `on` is set, like a bug that every step hits."""

    def __init__(self, scheduler):
        self.on = False
        self._schedule = scheduler.schedule
        scheduler.schedule = self

    def __call__(self):
        if self.on:
            raise RuntimeError("scheduler bug")
        return self._schedule()


def greedy(max_tokens: int, **overrides) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **overrides)


def run_all(engine: LLMEngine, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
            prefix: str = "r") -> dict[str, list[int]]:
    """Adds every prompt at once and steps until all finish; returns token ids per request id."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    outputs: dict[str, list[int]] = {}
    for index, (prompt, param) in enumerate(zip(prompts, params, strict=True)):
        request_id = f"{prefix}{index}"
        engine.add_request(GenerateRequest(request_id, tuple(prompt), param))
        outputs[request_id] = []
    for _ in range(100_000):
        if not engine.has_work:
            break
        for output in engine.step():
            outputs[output.request_id].extend(output.new_token_ids)
    assert not engine.has_work, "engine did not finish"
    return outputs


def collect_steps(engine: LLMEngine, tokens: dict[str, list[int]], steps: int | None = None) -> None:
    """Steps the engine (`steps` times, or until it has no work), adding each request's new token ids."""
    count = 0
    while engine.has_work and (steps is None or count < steps):
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        count += 1


def assert_pool_idle(engine: LLMEngine) -> None:
    """After every request ended: no KV is held for requests, and the chunks add up to the budget."""
    telemetry = engine.pool.telemetry()
    assert engine.kv.num_used_chunks() == 0
    assert not engine.kv.requests and engine.kv.slots.num_used == 0
    held = sum(telemetry.chunks_per_client.values())
    assert held + telemetry.num_free_chunks == telemetry.num_chunks
    assert telemetry.chunks_per_client["kv"] == engine.kv.num_cached_chunks()


class ScriptedOffload(LayerwiseOffload):
    """Admits each request with the layers the test names on the host, whether or not it would fit,
    and never promotes by itself (the tests promote and demote at chosen steps)."""

    def __init__(self, kv, slo, layers_by_request: dict[str, tuple[int, ...]]):
        super().__init__(kv, slo)
        self.layers_by_request = layers_by_request
        self.imported_layers: tuple[int, ...] | None = None  # set: a migrated request's layers put on the host

    def layers_to_offload(self, request, num_cached, end, need, available, running=()):
        return self.layers_by_request.get(request.request_id, ())

    def layers_to_import(self, num_tokens, room, available):
        if self.imported_layers is None:
            return super().layers_to_import(num_tokens, room, available)
        return self.imported_layers

    def promote(self, running, spare_chunks, parked=frozenset()):
        return 0  # never by itself

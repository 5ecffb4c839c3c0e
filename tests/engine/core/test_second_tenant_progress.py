"""Progress under a second pool tenant (another model's KV in an engine group, here a `pressure` client): when
the tenant leaves less room than a half-prefilled prompt's whole KV needs, the prompt waits on the host without
thrashing (before the fix it swapped itself in and out forever and starved the swapped decodes), the decodes come
back and finish, and once the room returns the prompt finishes. Greedy tokens equal transformers' fp32 tokens,
and after every step each allocated host-buffer slot is held by exactly one request page (nothing freed twice,
nothing leaked). A tiny 2-layer Llama and a frozen clock make it deterministic and quick (~3 s)."""

from __future__ import annotations

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from tests.engine.core.test_chunk_policy import checked_steps
from tests.engine.engine_helpers import assert_pool_idle, greedy
from tests.engine.reference import hf_greedy, hf_model_from_source

NOW = 5000.0
ROOM = 55  # chunks the tenant leaves: one decode with its sampled row fits, the 240-token prompt's KV does not


def assert_host_exact(kv) -> None:
    held = kv.host_slots_held()
    assert len(held) == len(set(held)), "a host slot is held twice"
    assert len(held) == kv.host_buffer.num_slots - kv.host_buffer.num_free, "host slots leaked or freed twice"


def test_a_prompt_the_pool_cannot_hold_waits_while_swapped_decodes_finish(tiny_llama_dir, smollm2_tokenizer,
                                                                         prompts):
    long_prompt = ([token for prompt in prompts for token in prompt] * 3)[:240]
    requests = [list(prompt) for prompt in prompts[:4]] + [long_prompt]
    reference = hf_greedy(hf_model_from_source(str(tiny_llama_dir)), requests, 16)
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_threads=1, max_model_len=300,
                                    max_num_seqs=8, max_num_batched_tokens=16, tokens_per_page=16,
                                    device_memory_bytes=64 << 20, host_buffer_bytes=8 << 20,
                                    enable_prefix_caching=False, preemption_mode="swap"),
                       tokenizer=smollm2_tokenizer)
    scheduler, kv, pool = engine.scheduler, engine.kv, engine.pool
    scheduler.clock = lambda: NOW
    pool.register("pressure")
    pressure = []
    tokens: dict[str, list[int]] = {}
    try:
        for index, prompt in enumerate(requests[:4]):
            engine.add_request(GenerateRequest(f"d{index}", tuple(prompt), greedy(16), arrival_time=NOW))
        while any(len(tokens.get(f"d{index}", [])) < 2 for index in range(4)):
            checked_steps(engine, tokens, 1)
        engine.add_request(GenerateRequest("p", tuple(long_prompt), greedy(8), arrival_time=NOW))
        checked_steps(engine, tokens, 1)
        assert 0 < scheduler.requests["p"].num_computed_tokens < len(long_prompt)  # admitted: it fit then
        pressure = pool.inflate("pressure", kv.num_available_chunks() - ROOM)
        checked_steps(engine, tokens, 1)  # the prompt's next chunk does not fit: it and the decodes are swapped
        prompt = scheduler.requests["p"]
        assert prompt in scheduler.swapped and len(scheduler.swapped) == 4
        # the head of the queue, as after the prompt preempted itself with the decodes already out (the order the
        # colleague's run reached): those behind it must not wait for it
        scheduler.swapped.remove(prompt)
        scheduler.swapped.appendleft(prompt)
        for _ in range(400):  # the decodes come back one by one and finish; the prompt waits on the host
            if all(len(tokens.get(f"d{index}", [])) == 16 for index in range(4)):
                break
            checked_steps(engine, tokens, 1)
            assert_host_exact(kv)
        assert all(len(tokens[f"d{index}"]) == 16 for index in range(4))
        swaps = scheduler.num_swaps
        checked_steps(engine, tokens, 20)  # nothing fits the prompt: it waits, it does not thrash
        assert scheduler.num_swaps == swaps <= 6
        assert [r.request_id for r in scheduler.swapped] == ["p"] and not scheduler.running
        assert_host_exact(kv)
        pool.deflate("pressure", pressure)  # the other tenant leaves: the prompt comes back and finishes
        pressure = []
        checked_steps(engine, tokens, None)
        assert_host_exact(kv)
        assert kv.host_buffer.num_free == kv.host_buffer.num_slots
        for index, expected in enumerate(reference):
            name = f"d{index}" if index < 4 else "p"
            assert tokens[name] == expected[: len(tokens[name])], name
        assert len(tokens["p"]) == 8
        assert pool.telemetry().num_exhausted == 0
        assert_pool_idle(engine)
    finally:
        if pressure:
            pool.deflate("pressure", pressure)
        engine.close()

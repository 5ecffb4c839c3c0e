"""The KV audit (EngineConfig.check_kv_invariants): silent over a healthy served run, and when a mapping breaks it
stops the loop with the violation and the trail of events that led there (engine/kv_audit.py)."""

from __future__ import annotations

import asyncio

import pytest

from engine.api import GenerateRequest
from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError
from engine.kv_audit import KVAudit, KVInvariantError
from tests.engine.engine_helpers import greedy, tiny_engine


async def _collect(async_engine, request):
    return [output async for output in async_engine.generate(request)]


def test_an_audited_loop_serves_and_checks_after_every_event(tiny_llama_dir, smollm2_tokenizer, prompts):
    engine = tiny_engine(tiny_llama_dir, smollm2_tokenizer, check_kv_invariants=True)

    async def main():
        async_engine = AsyncEngine(engine)
        await async_engine.start()
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*(
                _collect(async_engine, GenerateRequest(f"r{index}", tuple(prompts[index]), greedy(6)))
                for index in range(3))), timeout=60)
            return outputs, async_engine._audit.num_checks
        finally:
            await async_engine.shutdown()

    outputs, num_checks = asyncio.run(main())
    assert [out[-1].finish_reason for out in outputs] == ["length"] * 3
    assert num_checks >= 3 + 6  # three adds, at least six steps


def test_a_stray_mapping_is_reported_with_the_events_before_it(tiny_llama_dir, smollm2_tokenizer, prompts):
    engine = tiny_engine(tiny_llama_dir, smollm2_tokenizer)
    try:
        audit = KVAudit(engine.kv)
        engine.add_request(GenerateRequest("a", tuple(prompts[0]), greedy(4)))
        engine.step()
        audit.after("step: a")
        # a chunk mapped into the next free slot, which no request holds: what a later grow trips over
        chunk = engine.pool.inflate("kv", 1)[0]
        key = engine.kv.layout.tensors[0][0]
        key.map_page(engine.kv.spec.pages_per_slot, chunk)
        with pytest.raises(KVInvariantError) as raised:
            audit.after("call stray_map('b')")
        message = str(raised.value)
        assert "slot 1 (None) layer 0 K page 0: mapped, its block has no chunk there" in message
        assert "step: a -> slots ['a']" in message and "call stray_map('b') -> slots ['a']" in message
        key.unmap_page(engine.kv.spec.pages_per_slot)
        engine.pool.deflate("kv", [chunk])
    finally:
        engine.close()


def test_a_broken_mapping_stops_the_loop_and_its_streams_hear_it(tiny_llama_dir, smollm2_tokenizer, prompts):
    engine = tiny_engine(tiny_llama_dir, smollm2_tokenizer, check_kv_invariants=True)
    stray = engine.pool.inflate("kv", 1)[0]

    def break_a_mapping(engine):
        engine.kv.layout.tensors[1][1].map_page(engine.kv.spec.pages_per_slot, stray)

    async def main():
        async_engine = AsyncEngine(engine)
        await async_engine.start()
        try:
            stream = asyncio.ensure_future(
                _collect(async_engine, GenerateRequest("long", tuple(prompts[0]), greedy(200))))
            await asyncio.sleep(0.2)
            await async_engine.run_in_engine(break_a_mapping)
            with pytest.raises(EngineDeadError, match="KV mappings broken"):
                await asyncio.wait_for(stream, timeout=30)
            with pytest.raises(EngineDeadError):
                await async_engine.check_health()
        finally:
            engine.kv.layout.tensors[1][1].unmap_page(engine.kv.spec.pages_per_slot)
            engine.pool.deflate("kv", [stray])
            await async_engine.shutdown()

    asyncio.run(main())

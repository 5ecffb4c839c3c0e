"""Layer-wise KV offloading (LayerKV) gives transformers' greedy tokens: requests with no, some and
all but one layer on the host, in one batch with fully resident requests, with chunked prefill
(prefill writes offloaded layers straight to the host), with layers demoted and promoted during
decode, through every staging mode (copy thread, inline, in place). Bookkeeping ends at zero: no
chunk, host slot or staging leak."""

from __future__ import annotations

import pytest

from engine import migration
from engine.api import GenerateRequest
from engine.core.engine import LLMEngine
from engine.core.sampling_workspace import SampledRows
from tests.engine.core.test_engine_exactness import NUM_NEW, assert_same, small_config
from tests.engine.engine_helpers import PROMPTS, ScriptedOffload, assert_pool_idle, collect_steps, greedy, run_all
from tests.engine.reference import hf_greedy

NUM_LAYERS = 30  # SmolLM2-135M


@pytest.fixture(scope="module")
def reference(prompts, hf_smollm2):
    return hf_greedy(hf_smollm2, prompts, NUM_NEW)


OFFLOADED = {
    "r0": (),  # fully resident, in the same batch as the others
    "r1": tuple(range(15, NUM_LAYERS)),  # some (the top half)
    "r2": tuple(range(1, NUM_LAYERS)),  # all but the first
    "r3": tuple(range(NUM_LAYERS - 1)),  # all but the last
    "r4": tuple(range(0, NUM_LAYERS, 2)),  # every other layer: every fetch overlaps a resident layer
    "r6": (0, 29),  # the longest prompt: chunked into several steps
}


# copy is the GPU's path; inline and in_place run with `make test-all` (each loads the model again)
@pytest.mark.parametrize("staging", ["copy", pytest.param("inline", marks=pytest.mark.slow),
                                     pytest.param("in_place", marks=pytest.mark.slow)])
def test_offloaded_layers_give_transformers_tokens(smollm2_tokenizer, prompts, reference, staging):
    config = small_config(kv_offload="layerwise", kv_staging=staging, num_threads=1)
    engine = LLMEngine(config, tokenizer=smollm2_tokenizer)
    try:
        engine.scheduler.offload = ScriptedOffload(engine.kv, engine.scheduler.slo, OFFLOADED)
        # one step in: prompts are admitted with their layers where the script says
        tokens: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            engine.add_request(GenerateRequest(f"r{index}", tuple(prompt), greedy(NUM_NEW)))
        collect_steps(engine, tokens, steps=1)
        assert engine.kv.offloaded_layers("r2") == OFFLOADED["r2"]
        assert engine.kv.layer_chunk_counts("r2")[5][0] == 0 < engine.kv.layer_chunk_counts("r2")[0][0]
        assert engine.staging.bytes_fetched_last_step == 0  # first chunks: only write-backs
        collect_steps(engine, tokens)
        assert_same(tokens, reference)
        assert engine.kv.num_bytes_promoted == 0  # every offloaded layer stayed on the host to the end
        if staging == "in_place":  # host pages are read where they are: nothing staged
            assert engine.staging.bytes_fetched == 0 and engine.kv.host_tier.num_used == 0
        else:
            assert engine.staging.bytes_fetched > 0
        assert_pool_idle(engine)
        assert engine.kv.host_buffer.used_bytes == 0 and engine.pool.num_held("activations") >= 0
    finally:
        engine.close()


@pytest.mark.parametrize("staging", [pytest.param("copy", marks=pytest.mark.slow), "in_place"])
def test_demote_and_promote_during_decode_keep_tokens(smollm2_tokenizer, prompts, reference, staging):
    config = small_config(kv_offload="layerwise", kv_staging=staging, num_threads=1)
    engine = LLMEngine(config, tokenizer=smollm2_tokenizer)
    try:
        engine.scheduler.offload = ScriptedOffload(engine.kv, engine.scheduler.slo, {})
        chosen = [0, 3, 6]
        for index in chosen:
            engine.add_request(GenerateRequest(f"r{index}", tuple(prompts[index]), greedy(NUM_NEW)))
        tokens: dict[str, list[int]] = {}
        while not all(len(tokens.get(f"r{i}", [])) >= 3 for i in chosen):
            collect_steps(engine, tokens, steps=1)
        held = engine.pool.num_held("kv")
        freed = sum(engine.kv.demote("r0", layer) for layer in range(4, NUM_LAYERS))
        freed += sum(engine.kv.demote("r6", layer) for layer in range(0, NUM_LAYERS, 3))
        assert engine.pool.num_held("kv") == held - freed and freed > 0
        collect_steps(engine, tokens, steps=3)  # decodes with layers fetched from the host
        assert engine.staging.bytes_fetched_last_step > 0 if staging == "copy" else engine.kv.host_tier.num_used > 0
        assert engine.kv.promote("r6", 3) and engine.kv.promote("r0", 29)
        assert engine.kv.layer_chunk_counts("r6")[3][1] == 0
        collect_steps(engine, tokens)
        for index in chosen:
            assert tokens[f"r{index}"] == reference[index], index
        assert_pool_idle(engine)
        assert engine.kv.host_buffer.used_bytes == 0
    finally:
        engine.close()


@pytest.mark.slow  # CI time (10.5 s): offloaded layers keep their default-suite exactness test below
def test_layerwise_admission_under_a_tight_budget_matches_transformers(smollm2_tokenizer, prompts, reference):
    """The real policy: a pool too small for every prompt's whole KV at once admits them anyway
    (top layers on the host), demotes before preempting, promotes when memory frees."""
    probe = LLMEngine(small_config(num_threads=1), tokenizer=smollm2_tokenizer)
    weights = probe.pool.num_held("weights")
    activations = probe.runner.activation_chunks(probe.config.max_num_batched_tokens + 16, SampledRows.plain(16))
    page_bytes = probe.kv_spec.page_bytes
    kv_one_prompt = probe.kv.chunks_to_grow(None, max(len(p) for p in prompts) + NUM_NEW)
    probe.close()
    budget = (weights + activations + 2 * kv_one_prompt) * page_bytes
    config = small_config(kv_offload="layerwise", device_memory_bytes=budget, num_threads=1)
    engine = LLMEngine(config, tokenizer=smollm2_tokenizer)
    try:
        ours = run_all(engine, prompts, greedy(NUM_NEW))
        assert_same(ours, reference)
        assert engine.scheduler.offload.num_partial_admissions > 0  # some layers really lived on the host
        assert_pool_idle(engine)
        assert engine.kv.host_buffer.used_bytes == 0
    finally:
        engine.close()


@pytest.mark.slow  # two engines and a migration (~1 min of CPU): `make test-all`
@pytest.mark.parametrize("staging", ["copy", "in_place"])
def test_a_request_migrated_with_layers_on_the_host_gives_transformers_tokens(smollm2_tokenizer, prompts,
                                                                               reference, staging):
    """The source holds layers 10-29 of the request on the host from admission and demotes layer 5 while it
    decodes; staged copies (read_kv overlays the host pages) carry them to a destination that holds every
    layer on its device."""
    source = LLMEngine(small_config(kv_offload="layerwise", kv_staging=staging, num_threads=1),
                       tokenizer=smollm2_tokenizer)
    destination = LLMEngine(small_config(num_threads=1), tokenizer=smollm2_tokenizer)
    try:
        source.scheduler.offload = ScriptedOffload(source.kv, source.scheduler.slo, {"r6": tuple(range(10, 30))})
        tokens: dict[str, list[int]] = {}
        source.add_request(GenerateRequest("r6", tuple(prompts[6]), greedy(NUM_NEW)))
        while len(tokens.get("r6", [])) < 2:  # chunked prefill, then a decode
            collect_steps(source, tokens, steps=1)
        stages = [migration.copy_kv(source, "r6", 0)]
        assert source.kv.demote("r6", 5) > 0
        assert source.kv.offloaded_layers("r6") == (5, *range(10, 30))
        collect_steps(source, tokens, steps=2)  # it decodes on, staging its host layers
        stages.append(migration.copy_kv(source, "r6", stages[-1].end))
        snapshot = migration.pause(source, "r6")
        stages.append(migration.copy_kv(source, "r6", stages[-1].end))
        assert migration.reserve(destination, "r6", snapshot.num_tokens)
        for stage in stages:
            migration.write_kv(destination, "r6", stage)
        migration.attach(destination, snapshot, snapshot.num_computed_tokens)
        migration.release(source, "r6")
        assert_pool_idle(source)
        assert source.kv.host_buffer.used_bytes == 0 and source.kv.num_offloaded_host_chunks == 0
        assert destination.kv.offloaded_layers("r6") == ()  # arrives whole on the destination's device
        collect_steps(destination, tokens)
        assert tokens["r6"] == reference[6][: len(tokens["r6"])] and len(tokens["r6"]) == len(reference[6])
        assert_pool_idle(destination)
    finally:
        source.close()
        destination.close()


DEVICE_LAYERS = 12  # of 30: what the destination's device takes of the migrated request


@pytest.mark.slow  # CI time: layer offload and migration each keep their own default-suite exactness tests
@pytest.mark.parametrize("staging", ["copy", "in_place"])
def test_a_request_migrated_onto_the_destinations_host_gives_transformers_tokens(smollm2_tokenizer, hf_smollm2,
                                                                                 staging):
    """A destination whose device holds only 12 of the request's 30 layers (besides a step's activations and
    the next decode's staging) reserves them there and puts layers 12-29 in its host buffer (in place: host-tier
    chunks); the staged copies land on both tiers, and it decodes on to transformers' tokens."""
    prompt = smollm2_tokenizer(" ".join(PROMPTS[i] for i in (6, 2, 4))).input_ids  # long enough that KV counts
    expected = hf_greedy(hf_smollm2, [prompt], NUM_NEW)[0]
    source = LLMEngine(small_config(num_threads=1), tokenizer=smollm2_tokenizer)
    destination = None
    try:
        spec = source.kv_spec
        tokens: dict[str, list[int]] = {}
        source.add_request(GenerateRequest("r6", tuple(prompt), greedy(NUM_NEW)))
        while len(tokens.get("r6", [])) < 3:
            collect_steps(source, tokens, steps=1)
        stages = [migration.copy_kv(source, "r6", 0)]
        collect_steps(source, tokens, steps=1)
        snapshot, tail = migration.pause_and_copy_tail(source, "r6", stages[-1].end)
        pages = spec.num_pages(snapshot.num_tokens + spec.tokens_per_page)  # the reservation: +1 page of growth
        decode_pages = spec.num_pages(snapshot.num_tokens)  # what the next decode stages per offloaded layer
        staging_need = 0 if staging == "in_place" else 2 * 2 * decode_pages  # two consecutive layers, K and V
        decode_step = source.runner.activation_chunks(1, SampledRows.plain(1))  # a decode step's activations
        # the smallest workspace a pool may have (an eighth of the peak) comes on top of it, so KV gets less
        workspace = max(decode_step, -(-source.peak_activation_bytes // 8 // spec.page_bytes) + 1)
        kv_chunks = 2 * DEVICE_LAYERS * pages + staging_need + 1  # one more layer would need 2 x pages more
        budget = (source.pool.num_held("weights") + workspace + kv_chunks - (workspace - decode_step)) * spec.page_bytes
        assert kv_chunks > workspace - decode_step
        destination = LLMEngine(small_config(kv_offload="layerwise", kv_staging=staging, num_threads=1,
                                             device_memory_bytes=budget), tokenizer=smollm2_tokenizer)
        assert destination.kv.num_available_chunks() == decode_step + kv_chunks
        assert migration.reserve(destination, "r6", snapshot.num_tokens)
        assert destination.kv.offloaded_layers("r6") == tuple(range(DEVICE_LAYERS, NUM_LAYERS))
        counts = [(2 * pages, 0)] * DEVICE_LAYERS + [(0, 2 * pages)] * (NUM_LAYERS - DEVICE_LAYERS)
        assert destination.kv.layer_chunk_counts("r6") == counts
        assert destination.pool.num_held("kv") == 2 * DEVICE_LAYERS * pages
        host_chunks = 2 * (NUM_LAYERS - DEVICE_LAYERS) * pages
        if staging == "in_place":
            assert destination.kv.host_tier.num_used == host_chunks
        else:
            assert destination.kv.host_buffer.used_bytes == host_chunks * spec.page_bytes
        for stage in [*stages, tail]:
            migration.write_kv(destination, "r6", stage)
        migration.attach(destination, snapshot, snapshot.num_computed_tokens)
        migration.release(source, "r6")
        assert_pool_idle(source)
        # what the controller plans with: a `none` engine reports no host room; this one its host's free pages and
        # r6's cost with 1..30 top layers on a host (the splits its own reserve chose from)
        assert migration.host_room(source) is None
        room = migration.host_room(destination)
        assert (room.pages, room.staged) == (destination.kv.host_room(), staging == "copy")
        (load,) = migration.request_loads(destination)
        assert load.is_migratable and load.host_splits == tuple(
            destination.scheduler.offload.import_splits(load.num_tokens, load.num_tokens))
        assert [s.num_host_layers for s in load.host_splits] == list(range(1, NUM_LAYERS + 1))
        collect_steps(destination, tokens, steps=1)
        if staging == "copy":  # the decode fetched layers 12-29 from the host
            assert destination.staging.bytes_fetched_last_step == 2 * (NUM_LAYERS - DEVICE_LAYERS) * decode_pages \
                * spec.page_bytes
        collect_steps(destination, tokens)
        assert tokens["r6"] == expected
        assert_pool_idle(destination)
        assert destination.kv.host_buffer.used_bytes == 0 and destination.kv.num_offloaded_host_chunks == 0
    finally:
        source.close()
        if destination is not None:
            destination.close()

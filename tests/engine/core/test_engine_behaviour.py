"""LLMEngine behaviour beyond greedy exactness: pool accounting after finish and abort, KV and
activations trading chunks, seeded sampling, typed errors for bad input, stop conditions, and
prefix pages shared as the very same physical chunks.

One module-scoped engine serves every test but the elastic one (which needs a tight budget); each
test uses prompts no other test uses, so prefix-cache state left by one test cannot change another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from engine.api import GenerateRequest, InvalidRequestError, RequestOutput
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.sampling_workspace import SampledRows
from engine.sampling_params import SamplingParams
from engine.text.tokenizer import encode_chat
from tests.engine.engine_helpers import PROMPTS, assert_pool_idle, greedy

PAGE = 16


def small_config(**overrides) -> EngineConfig:
    base = dict(dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32,
                tokens_per_page=PAGE, device_memory_bytes=1 << 30, host_buffer_bytes=16 << 20)
    base.update(overrides)
    return EngineConfig(**base)


@dataclass
class Finished:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    outputs: list[RequestOutput] = field(default_factory=list)


def collect(outputs: list[RequestOutput], into: dict[str, Finished]) -> None:
    for output in outputs:
        result = into.setdefault(output.request_id, Finished())
        assert result.finish_reason is None, f"{output.request_id} sent an output after finishing"
        result.token_ids.extend(output.new_token_ids)
        result.text += output.text_delta
        result.finish_reason = output.finish_reason
        result.outputs.append(output)


def drive(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, Finished]:
    """Adds every request at once, steps until all finish; tokens, text and finish reason per id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(GenerateRequest(request_id, tuple(prompt), params))
    results: dict[str, Finished] = {}
    for _ in range(10_000):
        if not engine.has_work:
            break
        collect(engine.step(), results)
    assert not engine.has_work, "engine did not finish"
    assert set(results) == set(requests)
    assert all(result.finish_reason is not None for result in results.values())
    return results


def chunks_per_block(engine: LLMEngine) -> int:
    return 2 * engine.model_config.num_layers  # one K and one V page per layer


def step_until(engine: LLMEngine, done, limit: int = 200) -> dict[str, Finished]:
    results: dict[str, Finished] = {}
    for _ in range(limit):
        if done():
            return results
        collect(engine.step(), results)
    raise AssertionError("condition not reached")


@pytest.fixture(scope="module")
def engine(smollm2_tokenizer):
    engine = LLMEngine(small_config(), tokenizer=smollm2_tokenizer)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tokenize(smollm2_tokenizer):
    return lambda text: list(smollm2_tokenizer(text).input_ids)


PARIS = PROMPTS[0]  # greedy: " Paris.\n\nThe answer is:" (no EOS within 8 tokens)


@pytest.fixture(scope="module")
def paris_greedy(engine, tokenize):
    """Greedy tokens of PARIS when the engine runs it alone (the reference other tests compare to)."""
    result = drive(engine, {"paris": (tokenize(PARIS), greedy(8))})["paris"]
    assert result.finish_reason == "length" and len(result.token_ids) == 8
    return result


# ---- pool accounting -----------------------------------------------------------------------------


def test_pool_holds_only_evictable_cache_after_a_batch(engine, tokenize):
    prompts = [tokenize(f"Batch {i}: " + text) for i, text in enumerate(PROMPTS[1:6])]
    evictable_before = engine.kv.prefix.num_evictable_chunks
    results = drive(engine, {f"batch{i}": (prompt, greedy(3)) for i, prompt in enumerate(prompts)})
    assert all(len(result.token_ids) == 3 and result.finish_reason == "length" for result in results.values())
    assert_pool_idle(engine)
    # exactly the full pages of the five requests stay cached: (prompt + 3 - 1 computed tokens) // PAGE each
    expected_blocks = sum((len(prompt) + 2) // PAGE for prompt in prompts)
    assert expected_blocks > 0
    new_cached = engine.kv.prefix.num_evictable_chunks - evictable_before
    assert new_cached == expected_blocks * chunks_per_block(engine)


def test_abort_mid_prefill_mid_decode_and_waiting_frees_everything(engine, tokenize):
    long_prompt = tokenize("Abort test. " + PROMPTS[6] + " " + PROMPTS[4] + " " + PROMPTS[7])
    decode_prompt = tokenize("Abort test two: " + PROMPTS[2])
    waiting_prompt = tokenize("Abort test three: " + PROMPTS[3])
    assert len(long_prompt) > 2 * engine.config.max_num_batched_tokens  # at least three prefill steps
    per_block = chunks_per_block(engine)
    evictable_before = engine.kv.prefix.num_evictable_chunks
    engine.add_request(GenerateRequest("decoding", tuple(decode_prompt), greedy(30)))
    engine.add_request(GenerateRequest("prefilling", tuple(long_prompt), greedy(30)))
    engine.add_request(GenerateRequest("waiting", tuple(waiting_prompt), greedy(30)))
    scheduler = engine.scheduler
    results = step_until(engine, lambda: len(scheduler.requests["decoding"].output_token_ids) >= 2)
    prefilling, decoding = scheduler.requests["prefilling"], scheduler.requests["decoding"]
    assert prefilling.is_prefilling and 0 < prefilling.num_computed_tokens < len(long_prompt)
    assert not decoding.is_prefilling
    assert scheduler.requests["waiting"] in scheduler.waiting  # the token budget kept it out so far
    # KV in use is exactly the pages mapped for the two running requests
    mapped_blocks = sum(1 for rid in ("prefilling", "decoding")
                        for pages in engine.kv.requests[rid].blocks for block in pages if block is not None)
    assert engine.kv.num_used_chunks() == mapped_blocks * per_block > 0
    assert engine.kv.slots.num_used == 2
    computed = {rid: scheduler.requests[rid].num_computed_tokens for rid in ("prefilling", "decoding")}

    for request_id in ("prefilling", "decoding", "waiting"):
        output = engine.abort(request_id)
        assert output is not None and output.finish_reason == "abort" and output.new_token_ids == ()
    assert engine.abort("prefilling") is None and engine.abort("never-added") is None
    assert not engine.has_work and engine.step() == []
    assert_pool_idle(engine)
    # every full page they computed stays cached (evictable); nothing else is held
    new_blocks = sum(num // PAGE for num in computed.values())
    assert engine.kv.prefix.num_evictable_chunks - evictable_before == new_blocks * per_block
    assert results["decoding"].token_ids == decoding.output_token_ids

    # the aborted prefill's full pages serve the same prompt again
    rerun = drive(engine, {"rerun": (long_prompt, greedy(1))})["rerun"]
    assert rerun.outputs[-1].num_cached_tokens == computed["prefilling"] // PAGE * PAGE > 0
    assert_pool_idle(engine)


def test_activations_take_back_chunks_kv_freed(engine, smollm2_tokenizer, tokenize):
    """Elastic pool: with free chunks used up by cached KV pages, a bigger step's workspace inflates by
    reclaiming those KV pages (and the step's tokens are the same as with a roomy pool)."""
    per_block = chunks_per_block(engine)
    big_tokens = 64
    probe = engine.runner
    weight_chunks = engine.pool.num_held("weights")
    # KV room for six blocks beyond the largest step's workspace: filling it with cached pages from
    # smaller steps leaves fewer free chunks than the big step's workspace must grow by.
    other_chunks = probe.activation_chunks(big_tokens, SampledRows.plain(1)) + 6 * per_block
    config = small_config(max_num_seqs=4, max_num_batched_tokens=big_tokens, host_buffer_bytes=0,
                          device_memory_bytes=(weight_chunks + other_chunks) * engine.pool.chunk_bytes)
    small = LLMEngine(config, tokenizer=smollm2_tokenizer)
    try:
        assert small.pool.num_held("weights") == weight_chunks and small.pool.num_free() == other_chunks
        filler_tokens = 2 * PAGE  # each filler caches two blocks; its step's workspace is half the big one's
        fillers = [tokenize(f"Filler {i}: " + " ".join(PROMPTS[i:] + PROMPTS[:i]))[:filler_tokens] for i in range(5)]
        for index, prompt in enumerate(fillers):  # one at a time: every step is filler_tokens tokens
            drive(small, {f"fill{index}": (prompt, greedy(1))})
        assert_pool_idle(small)
        before = small.pool.telemetry()
        kv_before = before.chunks_per_client["kv"]
        activations_before = before.chunks_per_client["activations"]
        big_prompt = tokenize("Elastic: " + " ".join(PROMPTS))[:big_tokens]
        step_workspace = small.runner.activation_chunks(big_tokens, SampledRows.plain(1))
        step_kv = small.kv.chunks_to_grow(None, big_tokens)
        assert activations_before == small.runner.activation_chunks(filler_tokens, SampledRows.plain(1))
        # the precondition that makes this test mean something: free chunks alone cannot feed the step
        assert before.num_free_chunks < step_kv + step_workspace - activations_before
        assert kv_before == small.kv.prefix.num_evictable_chunks > 0

        small.add_request(GenerateRequest("big", tuple(big_prompt), greedy(3)))
        results: dict[str, Finished] = {}
        collect(small.step(), results)  # the whole 64-token prompt in one step
        after = small.pool.telemetry()
        assert after.chunks_per_client["activations"] == step_workspace
        reclaimed = after.num_chunks_reclaimed - before.num_chunks_reclaimed
        assert after.num_reclaims > before.num_reclaims and reclaimed > 0
        assert reclaimed % per_block == 0  # whole cached KV blocks were evicted for the workspace
        assert small.kv.num_used_chunks() == step_kv
        while small.has_work:
            collect(small.step(), results)
        assert_pool_idle(small)
        roomy = drive(engine, {"big-roomy": (big_prompt, greedy(3))})["big-roomy"]
        assert results["big"].token_ids == roomy.token_ids
        assert_pool_idle(engine)
    finally:
        small.close()


# ---- seeded sampling ------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine, tokenize):
    prompt = tokenize("Seeded: my favourite thing about autumn is")
    other = tokenize("Seeded: " + PROMPTS[4])

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=8, ignore_eos=True)

    alone = drive(engine, {"alone": (prompt, seeded(1234))})["alone"].token_ids
    batch = drive(engine, {
        "greedy": (other, greedy(8)),
        "seed99": (other, seeded(99)),
        "same": (prompt, seeded(1234)),
        "seed1235": (prompt, seeded(1235)),
        "other-prompt": (other, seeded(1234)),
    })
    assert len(alone) == 8
    assert batch["same"].token_ids == alone
    assert batch["seed1235"].token_ids != alone
    assert batch["seed99"].token_ids != batch["other-prompt"].token_ids
    greedy_other = batch["greedy"].token_ids
    assert greedy_other not in (batch["seed99"].token_ids, batch["other-prompt"].token_ids)
    assert_pool_idle(engine)


# ---- invalid input ------------------------------------------------------------------------------


def test_invalid_requests_raise_typed_errors_and_engine_keeps_serving(engine, tokenize, paris_greedy):
    paris = tokenize(PARIS)
    vocab = engine.model_config.vocab_size

    def rejected(request: GenerateRequest) -> InvalidRequestError:
        with pytest.raises(InvalidRequestError) as caught:
            engine.add_request(request)
        return caught.value

    engine.add_request(GenerateRequest("valid", tuple(paris), greedy(8)))
    error = rejected(GenerateRequest("empty", (), greedy(4)))
    assert error.param == "prompt"
    error = rejected(GenerateRequest("too-long", tuple(paris), greedy(engine.max_model_len - len(paris) + 1)))
    assert (error.param, error.code) == ("max_tokens", "context_length_exceeded")
    assert str(engine.max_model_len) in error.message
    for bad_token in (vocab, -1):
        error = rejected(GenerateRequest(f"oov{bad_token}", (*paris, bad_token), greedy(4)))
        assert error.param == "prompt"
    error = rejected(GenerateRequest("valid", tuple(paris), greedy(4)))
    assert error.param == "request_id"
    # exactly the fitting length is fine (validation only; it is aborted before running)
    engine.validate(GenerateRequest("fits", tuple(paris), greedy(engine.max_model_len - len(paris))))

    assert set(engine.scheduler.requests) == {"valid"}  # nothing of the rejected requests was queued
    results: dict[str, Finished] = {}
    while engine.has_work:
        collect(engine.step(), results)
    assert set(results) == {"valid"}
    assert results["valid"].token_ids == paris_greedy.token_ids
    assert results["valid"].finish_reason == "length"
    assert_pool_idle(engine)


# ---- stop conditions ----------------------------------------------------------------------------


def test_stop_strings_stop_token_ids_max_min_tokens_and_ignore_eos(engine, smollm2_tokenizer, tokenize,
                                                                   paris_greedy):
    paris = tokenize(PARIS)
    hi = encode_chat(smollm2_tokenizer, [{"role": "user", "content": "Hi"}])
    eos = smollm2_tokenizer.eos_token_id
    assert eos in engine.eos_token_ids
    reference = paris_greedy.token_ids
    assert smollm2_tokenizer.decode(reference[:2]) == " Paris."
    period = reference[1]

    def sample(**kwargs) -> SamplingParams:
        return SamplingParams(temperature=0.0, **kwargs)

    results = drive(engine, {
        "max3": (paris, sample(max_tokens=3)),
        "stop-id": (paris, sample(max_tokens=8, stop_token_ids=(period,))),
        "stop-newlines": (paris, sample(max_tokens=8, stop=["\n\n"])),
        "stop-inside-token": (paris, sample(max_tokens=8, stop=["aris", "answer"])),
        "stop-never": (paris, sample(max_tokens=8, stop=["zebra"])),
        "eos": (hi, sample(max_tokens=40)),
        "min-tokens": (hi, sample(max_tokens=40, min_tokens=14)),
        "ignore-eos": (hi, sample(max_tokens=14, ignore_eos=True)),
    })
    max3 = results["max3"]
    assert (max3.token_ids, max3.finish_reason) == (reference[:3], "length")
    stop_id = results["stop-id"]
    assert (stop_id.token_ids, stop_id.text, stop_id.finish_reason) == (reference[:2], " Paris", "stop")
    newlines = results["stop-newlines"]
    assert newlines.token_ids == reference[:4] and newlines.finish_reason == "stop"
    assert newlines.text == " Paris."
    inside = results["stop-inside-token"]
    assert (inside.token_ids, inside.text, inside.finish_reason) == (reference[:1], " P", "stop")
    never = results["stop-never"]
    assert never.token_ids == reference and never.finish_reason == "length"
    assert never.text == smollm2_tokenizer.decode(reference)
    # neither a stop string nor a stop token's text is ever sent
    assert "." not in stop_id.text and "\n\n" not in newlines.text and "aris" not in inside.text

    # "Hi" -> "Hello! How can I assist you today?" then EOS
    natural = results["eos"]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == eos
    num_before_eos = len(natural.token_ids) - 1
    assert 0 < num_before_eos < 14
    assert natural.text == smollm2_tokenizer.decode(natural.token_ids[:-1]) and "<|im_end|>" not in natural.text
    at_least = results["min-tokens"]
    assert at_least.token_ids[:num_before_eos] == natural.token_ids[:num_before_eos]
    assert eos not in at_least.token_ids[:14] and len(at_least.token_ids) > 14
    assert at_least.finish_reason == ("stop" if at_least.token_ids[-1] == eos else "length")
    ignoring = results["ignore-eos"]
    assert ignoring.token_ids[: num_before_eos + 1] == natural.token_ids  # EOS is generated, then more
    assert len(ignoring.token_ids) == 14 and ignoring.finish_reason == "length"
    assert all(len(result.outputs) == len(result.token_ids) for result in results.values())
    assert_pool_idle(engine)


# ---- prefix pages are the same physical chunks ---------------------------------------------------


def block_chunk_ids(engine: LLMEngine, request_id: str, num_pages: int) -> list[list[int]]:
    """Per layer group, per page: the chunk ids mapped for the request's first pages."""
    return [[[chunk.chunk_id for chunk in block.chunks] for block in pages[:num_pages]]
            for pages in engine.kv.requests[request_id].blocks]


def test_the_first_token_carries_its_queue_and_prefill_times(engine, tokenize):
    """The output with a request's first token says how long it waited to be scheduled and how long its prefill
    took from there (vLLM's request_queue_time / request_prefill_time); no other output carries them. A request
    admitted behind a prompt that fills the step's token budget (32 here) has waited at least that step."""
    long_prompt = tokenize("Timing: " + " ".join(f"word{i}" for i in range(30)))
    assert len(long_prompt) > 32  # two chunks
    results = drive(engine, {"timed-long": (long_prompt, greedy(3)),
                             "timed-short": (tokenize("Timing, the short one"), greedy(3))})
    for result in results.values():
        first, *later = result.outputs
        assert first.queue_time_s >= 0 and first.prefill_time_s > 0
        assert all(output.queue_time_s is None and output.prefill_time_s is None for output in later)
    long_first, short_first = results["timed-long"].outputs[0], results["timed-short"].outputs[0]
    assert short_first.queue_time_s > long_first.queue_time_s
    assert long_first.prefill_time_s > short_first.prefill_time_s  # two prefill steps against one


def test_prefix_hit_maps_the_same_physical_chunks(engine, tokenize):
    prompt = tokenize("Shared prefix. " + PROMPTS[6] + " " + PROMPTS[7])
    num_shared_pages = (len(prompt) - 1) // PAGE
    assert num_shared_pages >= 3
    kv = engine.kv
    layout = kv.layout
    engine.add_request(GenerateRequest("first", tuple(prompt), greedy(6)))
    scheduler = engine.scheduler
    step_until(engine, lambda: scheduler.requests["first"].output_token_ids)  # prefill done: pages committed
    engine.add_request(GenerateRequest("second", tuple(prompt), greedy(3)))
    step_until(engine, lambda: "second" in kv.requests)
    assert scheduler.requests["second"].num_cached_tokens == num_shared_pages * PAGE

    # while both run, the shared pages are the same blocks and the same chunks, mapped in two slots
    first_blocks, second_blocks = kv.requests["first"].blocks, kv.requests["second"].blocks
    first_slot, second_slot = kv.slot_of("first"), kv.slot_of("second")
    assert first_slot != second_slot
    for group, (first_pages, second_pages) in enumerate(zip(first_blocks, second_blocks, strict=True)):
        for page in range(num_shared_pages):
            block = first_pages[page]
            assert second_pages[page] is block and block.ref_count == 2
            assert all(chunk.num_mappings == 2 for chunk in block.chunks)
            for layer_index, layer in enumerate(kv.spec.groups[group].layers):
                for kind, tensor in enumerate(layout.tensors[layer]):  # K, V
                    chunk = block.chunks[2 * layer_index + kind]
                    assert tensor.chunk_at(layout._page(first_slot, page)) is chunk
                    assert tensor.chunk_at(layout._page(second_slot, page)) is chunk
        # the page after the shared prefix is private to each request
        private = num_shared_pages
        assert first_pages[private] is not second_pages[private]
        first_private = {chunk.chunk_id for chunk in first_pages[private].chunks}
        assert not first_private & {chunk.chunk_id for chunk in second_pages[private].chunks}
    shared_ids = block_chunk_ids(engine, "first", num_shared_pages)
    assert block_chunk_ids(engine, "second", num_shared_pages) == shared_ids
    assert len({chunk_id for group in shared_ids for page in group for chunk_id in page}) == (
        num_shared_pages * chunks_per_block(engine) * len(kv.spec.groups))

    results: dict[str, Finished] = {}
    while engine.has_work:
        collect(engine.step(), results)
    assert_pool_idle(engine)
    # once both finished, the pages are cached; a third request maps the very same chunks again
    engine.add_request(GenerateRequest("third", tuple(prompt + tokenize(" Again")), greedy(2)))
    step_until(engine, lambda: "third" in kv.requests)
    assert block_chunk_ids(engine, "third", num_shared_pages) == shared_ids
    while engine.has_work:
        collect(engine.step(), results)
    assert_pool_idle(engine)

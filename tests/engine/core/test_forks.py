"""n > 1: the choices of one prompt share its KV (prefilled once, forked) and draw the tokens separate requests
would draw; the pool holds a shared page once; aborting every choice, before or after the fork, frees it all.

The default suite runs on a tiny random Llama (SmolLM2's vocabulary, ~10 s in all): seeded draws, greedy tokens
against transformers on both layouts, the page sharing and the aborts. The same greedy checks on SmolLM2 are
`slow` (~35 s: a 135M model in fp32 and its transformers reference)."""

from __future__ import annotations

import pytest

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.request import RequestStatus
from engine.sampling_params import SamplingParams
from tests.engine.engine_helpers import assert_pool_idle, greedy
from tests.engine.reference import hf_greedy, hf_model_from_source

NUM_NEW = 10


def fork_config(model: str | None = None, **overrides) -> EngineConfig:
    return EngineConfig(model=model, dtype="float32", num_threads=2, max_model_len=256, max_num_seqs=8,
                        max_num_batched_tokens=32, tokens_per_page=16, device_memory_bytes=1 << 30,
                        host_buffer_bytes=16 << 20, **overrides)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, smollm2_tokenizer):
    engine = LLMEngine(fork_config(str(tiny_llama_dir)), tokenizer=smollm2_tokenizer)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_tiny_llama(tiny_llama_dir):
    return hf_model_from_source(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def prompt(prompts):
    prompt = prompts[6]  # 36 tokens: two chunks of 32 (the step budget); its last page is partly filled
    assert len(prompt) % 16 and len(prompt) > 32
    return prompt


def assert_pool_exact(engine: LLMEngine) -> None:
    """Every chunk the kv balloon holds backs exactly one block (a page shared by n choices counts once), and
    the balloons and the free chunks add up to the budget."""
    blocks = {id(block): block for state in engine.kv.requests.values() for pages in state.blocks
              for block in pages if block is not None}
    live = sum(len(block.chunks) for block in blocks.values())
    assert engine.kv.num_used_chunks() == live
    for block in blocks.values():
        holders = sum(1 for state in engine.kv.requests.values() for pages in state.blocks
                      for b in pages if b is block)
        assert block.ref_count == holders
    telemetry = engine.pool.telemetry()
    assert sum(telemetry.chunks_per_client.values()) + telemetry.num_free_chunks == telemetry.num_chunks


def run(engine: LLMEngine, prompt, params: list[SamplingParams], prefix: str, group: str | None,
        check_every_step: bool = True) -> tuple[dict[str, list[int]], int]:
    """Adds one request per choice (in one prompt group, or separate) and steps to the end; returns the tokens
    per choice and the prefill tokens the steps computed."""
    prefill_tokens = 0

    def count(plan) -> None:
        nonlocal prefill_tokens
        prefill_tokens += sum(len(chunk.token_ids) for chunk in plan.prefills)

    ids = [f"{prefix}{index}" for index in range(len(params))]
    for request_id, param in zip(ids, params, strict=True):
        engine.add_request(GenerateRequest(request_id, tuple(prompt), param, prompt_group=group))
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    engine.scheduler.plan_observers.append(count)
    try:
        while engine.has_work:
            for output in engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
            if check_every_step:
                assert_pool_exact(engine)
    finally:
        engine.scheduler.plan_observers.remove(count)
    return tokens, prefill_tokens


def drop_prefix_cache(engine: LLMEngine) -> None:
    while engine.kv.prefix.evictable:
        engine.kv._deflate_block(engine.kv.prefix.evict_oldest())


def drawn(seed: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=NUM_NEW, ignore_eos=True)


def test_seeded_choices_prefill_once_and_draw_what_separate_requests_draw(engine, prompt):
    params = [drawn(7), drawn(8), drawn(9)]
    together, prefilled = run(engine, prompt, params, "g", group="cmpl-1")
    assert prefilled == len(prompt)  # the prompt once, not three times
    assert_pool_idle(engine)
    drop_prefix_cache(engine)  # (separate requests must not hit the group's cached pages)
    separate, prefilled_separately = run(engine, prompt, params, "s", group=None)
    # separately, each request computes at least the prompt's last partial page (the prefix cache shares only
    # full pages already computed)
    assert prefilled_separately >= len(prompt) + 2 * (len(prompt) % 16)
    assert [together[f"g{i}"] for i in range(3)] == [separate[f"s{i}"] for i in range(3)]
    assert len({tuple(tokens) for tokens in together.values()}) > 1  # the seeds really drew differently
    assert all(len(tokens) == NUM_NEW for tokens in together.values())
    assert_pool_idle(engine)


@pytest.mark.parametrize("kv_layout", ["contiguous", "paged"])
def test_greedy_choices_equal_transformers(tiny_llama_dir, smollm2_tokenizer, prompt, hf_tiny_llama, kv_layout):
    """Forked greedy choices on both layouts (on `paged` the copy of the partial page is a small page)."""
    check_greedy_fork(LLMEngine(fork_config(str(tiny_llama_dir), kv_layout=kv_layout),
                                tokenizer=smollm2_tokenizer), prompt, hf_tiny_llama)


@pytest.mark.slow  # SmolLM2 fp32 engines and transformers' reference: ~35 s
@pytest.mark.parametrize("kv_layout", ["contiguous", "paged"])
def test_greedy_choices_equal_transformers_on_smollm2(smollm2_tokenizer, prompt, hf_smollm2, kv_layout):
    check_greedy_fork(LLMEngine(fork_config(kv_layout=kv_layout), tokenizer=smollm2_tokenizer), prompt, hf_smollm2)


def check_greedy_fork(engine: LLMEngine, prompt, hf_model) -> None:
    try:
        expected = hf_greedy(hf_model, [prompt], NUM_NEW)[0]
        tokens, prefilled = run(engine, prompt, [greedy(NUM_NEW)] * 3, "h", group="cmpl-2")
        assert prefilled == len(prompt)  # once
        assert tokens["h0"] == tokens["h1"] == tokens["h2"] == expected
        assert_pool_idle(engine)
    finally:
        engine.close()


def test_forked_choices_share_the_prompt_pages(engine, prompt):
    drop_prefix_cache(engine)
    for index in range(3):
        engine.add_request(GenerateRequest(f"k{index}", tuple(prompt), greedy(NUM_NEW), prompt_group="cmpl-3"))
    assert [engine.scheduler.requests[f"k{i}"].status for i in range(3)] == \
        [RequestStatus.WAITING, RequestStatus.FOLLOWING, RequestStatus.FOLLOWING]
    while any(engine.scheduler.requests[f"k{i}"].status is not RequestStatus.RUNNING for i in range(3)):
        engine.step()
    page_tokens = engine.kv_spec.tokens_per_page  # (at least a pool chunk: 32 tokens for the tiny model)
    assert len(prompt) % page_tokens
    full_pages = len(prompt) // page_tokens
    states = [engine.kv.requests[f"k{i}"] for i in range(3)]
    for page in range(full_pages):  # one block per full page, held by all three
        assert states[0].blocks[0][page] is states[1].blocks[0][page] is states[2].blocks[0][page]
        assert states[0].blocks[0][page].ref_count == 3
    partial = {id(state.blocks[0][full_pages]) for state in states}
    assert len(partial) == 3  # the partly filled page: one private copy each
    per_page = 2 * engine.kv_spec.num_layers
    # each choice holds its decoded tokens' page privately, the prompt's full pages once
    assert engine.kv.num_used_chunks() == (full_pages + 3) * per_page
    assert_pool_exact(engine)
    for index in range(3):  # what the HTTP layer does when the client leaves: abort every choice
        engine.abort(f"k{index}")
    assert not engine.has_work
    assert_pool_idle(engine)


def test_aborting_before_the_fork(engine, prompt):
    drop_prefix_cache(engine)
    for index in range(3):
        engine.add_request(GenerateRequest(f"a{index}", tuple(prompt), greedy(NUM_NEW), prompt_group="cmpl-4"))
    engine.step()  # the leader's first chunk; the followers wait
    assert engine.scheduler.requests["a1"].status is RequestStatus.FOLLOWING
    engine.abort("a0")  # the leader leaves: a1 leads, a2 follows it
    assert engine.scheduler.requests["a1"].status is RequestStatus.WAITING
    assert engine.scheduler.requests["a2"].status is RequestStatus.FOLLOWING
    engine.step()
    engine.abort("a2")
    engine.abort("a1")
    assert not engine.has_work
    assert_pool_idle(engine)

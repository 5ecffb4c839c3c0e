"""The sampler's workspace (issue 17): its temporaries come from the step's pool-backed workspace, are sized
per step from the sampled rows' kinds, are charged to the activations balloon, and the tokens and
logprobs sampled in it equal the reference computation (batch > 1) and, for greedy rows, transformers'."""

from __future__ import annotations

import pytest
import torch

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.sampler import Sampler, SamplingState, rows_of
from engine.core.sampling_workspace import SampledRows, peak_rows, sampling_plan
from engine.device.activation_workspace import ACTIVATIONS_CLIENT
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from tests.engine.engine_helpers import assert_pool_idle
from tests.engine.reference import hf_greedy

VOCAB = 4096  # a multiple of 64: the plan aligns every buffer to 64 bytes
NUM_NEW = 4


def reference_draw(row: torch.Tensor, temperature: float, top_p: float, seed: int) -> int:
    """Inverse-CDF draw written out with a full sort for the nucleus (what the sampler must equal)."""
    probabilities = (row / temperature).softmax(-1)
    ordered = probabilities.sort(descending=True).values
    before = ordered.cumsum(0) - ordered
    num_kept = max(int((before <= torch.tensor(top_p) * ordered.sum()).sum()), 1)
    probabilities = probabilities.masked_fill(probabilities < ordered[num_kept - 1], 0.0)
    cumulative = probabilities.cumsum(-1)
    uniform = torch.rand(1, generator=torch.Generator().manual_seed(seed))
    return int(torch.searchsorted(cumulative, (uniform * cumulative[-1]).unsqueeze(0), right=True))


def test_rows_are_sized_by_kind_and_plain_greedy_needs_nothing():
    greedy = SamplingState(SamplingParams(temperature=0))
    assert greedy.row_demand() == SampledRows.plain(1)
    assert sampling_plan(rows_of([greedy] * 8), VOCAB).num_bytes == 0
    states = [SamplingState(SamplingParams(temperature=0, logprobs=2)),
              SamplingState(SamplingParams(temperature=0.7, top_p=0.9, seed=1)),
              SamplingState(SamplingParams(temperature=0, repetition_penalty=1.2), prompt_token_ids=[3]),
              greedy]
    rows = rows_of(states)
    assert rows == SampledRows(num_rows=4, num_edited=1, num_drawn=1, num_logprobs=1, num_filtered=1)
    row_bytes = VOCAB * 4
    # one edited copy, two rows for the drawn one, one log_softmax row, and the filter scratch (4+8+4+1 B/entry)
    assert sampling_plan(rows, VOCAB).num_bytes == 4 * row_bytes + VOCAB * 17
    assert peak_rows(4) - rows_of(states) == SampledRows(0, -1, 3, 3, 3)


def test_logprobs_and_draws_at_batch_four_equal_the_reference_and_use_the_workspace():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    states = [SamplingState(SamplingParams(temperature=0, logprobs=3)),
              SamplingState(SamplingParams(temperature=0.8, top_p=0.9, seed=11, logprobs=0)),
              SamplingState(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_token_ids=[7]),
              SamplingState(SamplingParams(temperature=1.2, top_p=0.5, seed=12, logprobs=3))]
    plan = sampling_plan(rows_of(states), VOCAB)
    workspace = torch.full((plan.num_bytes,), 0xFF, dtype=torch.uint8)
    before = logits.clone()
    result = Sampler([]).sample(logits, states, workspace)
    assert torch.equal(logits, before)
    assert (workspace != 0xFF).sum() > 3 * VOCAB * 4  # the vocabulary-wide rows were written there

    log_probs = logits.log_softmax(-1)
    penalised = logits[2].clone()
    penalised[7] = penalised[7] / 2.0 if penalised[7] > 0 else penalised[7] * 2.0
    expected = [int(logits[0].argmax()), reference_draw(logits[1], 0.8, 0.9, 11), int(penalised.argmax()),
                reference_draw(logits[3], 1.2, 0.5, 12)]
    assert result.token_ids == expected
    for row in (0, 1, 3):
        entry = result.logprobs[row]
        assert entry.logprob == float(log_probs[row, expected[row]])  # the same kernel: bit for bit
        top_n = states[row].params.logprobs
        values, ids = log_probs[row].topk(top_n) if top_n else (torch.empty(0), torch.empty(0))
        assert entry.top == tuple(zip(ids.tolist(), values.tolist(), strict=True))
    assert result.logprobs[2] is None


# ---- in the engine: the workspace is charged to the activations balloon ------------------------------
def engine_config(**overrides) -> EngineConfig:
    base = dict(dtype="float32", num_threads=2, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                tokens_per_page=16, device_memory_bytes=1 << 30, host_buffer_bytes=0)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def engine_prompts(prompts):
    return prompts[:4]


def logprob_params(index: int) -> SamplingParams:
    if index % 2:  # drawn rows with a nucleus
        return SamplingParams(temperature=0.9, top_p=0.95, seed=index, logprobs=2, max_tokens=NUM_NEW, ignore_eos=True)
    return SamplingParams(temperature=0, logprobs=2, max_tokens=NUM_NEW, ignore_eos=True)


def test_an_engine_serving_no_logprobs_refuses_them_and_its_static_split_reserves_no_logprobs_rows(
        smollm2_tokenizer, engine_prompts):
    engine = LLMEngine(engine_config(pool_policy="static", max_logprobs=None), tokenizer=smollm2_tokenizer)
    try:
        vocab, pool = engine.model_config.vocab_size, engine.pool
        plan = type(engine.model).plan_buffers(engine.model_config, engine.model.shard, engine.dtype, 64 + 4, 4)
        reserved = plan.num_bytes + sampling_plan(peak_rows(4, logprobs=False), vocab).num_bytes
        assert pool.policy.shares[ACTIVATIONS_CLIENT] == -(-reserved // pool.chunk_bytes)
        assert sampling_plan(peak_rows(4), vocab).num_bytes - sampling_plan(peak_rows(4, logprobs=False), vocab) \
            .num_bytes == 4 * vocab * 4  # one fp32 log_softmax row per sequence fewer
        with pytest.raises(InvalidRequestError, match="does not return logprobs") as refused:
            engine.add_request(GenerateRequest("lp", tuple(engine_prompts[0]), SamplingParams(logprobs=0)))
        assert refused.value.param == "logprobs"
        with pytest.raises(ValueError):
            EngineConfig(max_logprobs=21)
    finally:
        engine.close()


@pytest.mark.parametrize("policy", ["elastic", pytest.param("static", marks=pytest.mark.slow)])  # CI time
def test_sampling_with_logprobs_is_charged_to_the_pool_and_matches_transformers(
        smollm2_tokenizer, engine_prompts, hf_smollm2, policy):
    engine = LLMEngine(engine_config(pool_policy=policy, max_logprobs=2), tokenizer=smollm2_tokenizer)
    pool, runner, vocab = engine.pool, engine.runner, engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="at most 2") as refused:  # above max_logprobs: a 400
        engine.add_request(GenerateRequest("too-many", tuple(engine_prompts[0]),
                                           SamplingParams(temperature=0, logprobs=3)))
    assert refused.value.param == "logprobs" and not engine.has_work
    if policy == "static":  # the static split reserves the sampler's peak at start
        peak = sampling_plan(peak_rows(4), vocab).num_bytes
        assert pool.policy.shares[ACTIVATIONS_CLIENT] * pool.chunk_bytes >= engine.peak_activation_bytes >= peak
    base = runner.workspace.buffer.tensor.data_ptr()
    seen = []
    sample = engine.sampler.sample

    def checked_sample(logits, states, workspace=None):
        rows = rows_of(states)
        need = sampling_plan(rows, vocab).num_bytes
        if need:  # the sampler's bytes lie in the pool-backed workspace, mapped and held by the balloon
            assert workspace is not None and workspace.numel() >= need
            start = workspace.data_ptr() - base
            assert 0 <= start and start + need <= pool.num_held(ACTIVATIONS_CLIENT) * pool.chunk_bytes
        assert runner.workspace.num_mapped == pool.num_held(ACTIVATIONS_CLIENT)
        telemetry = pool.telemetry()
        assert sum(telemetry.chunks_per_client.values()) <= telemetry.num_chunks
        seen.append(rows)
        return sample(logits, states, workspace)

    engine.sampler.sample = checked_sample
    plans = []
    engine.scheduler.plan_observers.append(plans.append)
    outputs: dict[str, list] = {}
    try:
        for index, prompt in enumerate(engine_prompts):
            engine.add_request(GenerateRequest(f"r{index}", tuple(prompt), logprob_params(index)))
            outputs[f"r{index}"] = []
        while engine.has_work:
            for output in engine.step():
                outputs[output.request_id].extend(output.logprobs)
        assert pool.telemetry().num_exhausted == 0
        assert_pool_idle(engine)
    finally:
        engine.close()
    assert max(rows.num_logprobs for rows in seen) == 4 and max(rows.num_drawn for rows in seen) == 2
    for plan in plans:  # every plan charged the rows it samples
        if not plan.is_empty:
            assert plan.sampled_rows.num_rows == len(plan.decodes) + sum(c.samples for c in plan.prefills)

    greedy = hf_greedy(hf_smollm2, [engine_prompts[0], engine_prompts[2]], NUM_NEW)
    assert [e.token_id for e in outputs["r0"]] == greedy[0] and [e.token_id for e in outputs["r2"]] == greedy[1]
    for index, prompt in enumerate(engine_prompts):  # logprobs of every row against transformers' fp32 forward
        entries = outputs[f"r{index}"]
        tokens = torch.tensor([list(prompt) + [e.token_id for e in entries]])
        with torch.no_grad():
            hf_logits = hf_smollm2(tokens).logits[0, len(prompt) - 1 : -1].float()
        reference = hf_logits.log_softmax(-1)
        for step, entry in enumerate(entries):
            assert entry.logprob == pytest.approx(float(reference[step, entry.token_id]), abs=2e-4)
            assert [t for t, _ in entry.top] == reference[step].topk(2).indices.tolist()

"""The batched sampler: exact greedy, seeded draws independent of the batch, filters, penalties,
min_tokens, logprobs, and RNG state migration."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.sampler import Sampler, SamplingState
from engine.sampling_params import SamplingParams

VOCAB = 1000
EOS = 2


def random_logits(num_rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def states_for(params_list, prompts=None):
    prompts = prompts or [()] * len(params_list)
    return [SamplingState(p, prompt) for p, prompt in zip(params_list, prompts, strict=True)]


def test_greedy_fast_path_is_argmax_and_leaves_logits_alone():
    logits = random_logits(8)
    before = logits.clone()
    states = states_for([SamplingParams(temperature=0)] * 8)
    result = Sampler([EOS]).sample(logits, states)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 8
    assert torch.equal(logits, before)
    assert all(s.num_output_tokens == 1 for s in states)


def test_greedy_rows_inside_a_mixed_batch_are_argmax():
    logits = random_logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)] * 3
    result = Sampler([EOS]).sample(logits, states_for(params))
    expected = logits.argmax(dim=-1).tolist()
    assert [result.token_ids[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]


def test_top_k_one_equals_greedy():
    logits = random_logits(16)
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(16)]
    assert Sampler([EOS]).sample(logits, states_for(params)).token_ids == logits.argmax(dim=-1).tolist()


def draw_sequence(params: SamplingParams, logits_rows: list[torch.Tensor], companions: int, seed: int) -> list[int]:
    """Sample one request for len(logits_rows) steps next to `companions` other random requests."""
    sampler = Sampler([EOS])
    state = SamplingState(params)
    others = [SamplingState(SamplingParams(temperature=0.9, top_p=0.8, seed=seed + i)) for i in range(companions)]
    tokens = []
    for step, row in enumerate(logits_rows):
        batch = torch.cat([random_logits(companions, seed=1000 * seed + step), row.unsqueeze(0)])
        position = companions // 2  # not always first or last
        batch = torch.cat([batch[:position], row.unsqueeze(0), batch[position:-1]])
        result = sampler.sample(batch, [*others[:position], state, *others[position:]])
        tokens.append(result.token_ids[position])
    return tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, seed=1234),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7),
    SamplingParams(temperature=0.7, min_p=0.05, seed=99),
    SamplingParams(temperature=1.0, top_p=0.95, seed=5, repetition_penalty=1.3, frequency_penalty=0.4),
])
def test_seeded_sampling_is_reproducible_whatever_the_batch(params):
    rows = [random_logits(1, seed=50 + step)[0] for step in range(12)]
    alone = draw_sequence(params, rows, companions=0, seed=1)
    assert draw_sequence(params, rows, companions=5, seed=2) == alone
    assert draw_sequence(params, rows, companions=2, seed=3) == alone
    unseeded = SamplingParams(**{**params.to_dict(), "seed": params.seed + 1})
    assert draw_sequence(unseeded, rows, companions=0, seed=1) != alone


def test_unseeded_requests_get_distinct_seeds():
    assert SamplingState(SamplingParams()).seed != SamplingState(SamplingParams()).seed


def sample_counts(params: SamplingParams, logits: torch.Tensor, num_draws: int) -> torch.Tensor:
    """How often each token is drawn from one row of `logits` (batched as many identical rows)."""
    batch = logits.expand(num_draws, -1).contiguous()
    states = [SamplingState(SamplingParams(**{**params.to_dict(), "seed": i})) for i in range(num_draws)]
    tokens = torch.tensor(Sampler([EOS]).sample(batch, states).token_ids)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float()


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 1.5])
    counts = sample_counts(SamplingParams(temperature=0.5), logits, 8000)
    expected = (logits / 0.5).softmax(-1) * 8000
    # Pearson chi-square with 5 degrees of freedom; 20.5 is its 0.999 quantile.
    assert float(((counts - expected) ** 2 / expected).sum()) < 20.5


def test_top_k_top_p_min_p_keep_exactly_the_allowed_tokens():
    probabilities = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    logits = probabilities.log()
    def support(**kwargs):
        return set(sample_counts(SamplingParams(**kwargs), logits, 4000).nonzero().flatten().tolist())

    assert support(top_k=3) == {0, 1, 2}
    # Nucleus 0.7: tokens 0, 1 reach 0.65 < 0.7, so token 2 is needed too.
    assert support(top_p=0.7) == {0, 1, 2}
    assert support(top_p=0.6) == {0, 1}
    # top-p over the top-k renormalised: top-3 mass 0.8, token 0 alone is 0.5 of it (0.4 of everything).
    assert support(top_k=3, top_p=0.45) == {0}
    assert support(top_p=0.45) == {0, 1}
    assert support(min_p=0.3) == {0, 1, 2}  # 0.3 * 0.40 = 0.12
    assert support(top_p=1e-6) == {0}


def test_a_wide_top_p_nucleus_is_kept_whole():
    logits = torch.zeros(5000)  # uniform: a 0.5 nucleus is 2500 tokens
    counts = sample_counts(SamplingParams(top_p=0.5), logits, 1500)
    drawn = counts.nonzero().flatten()
    assert 1024 < len(drawn) <= 2501


def test_repetition_presence_and_frequency_penalties_change_exactly_the_seen_logits():
    # A penalty is visible through the greedy choice: make the winner depend on it exactly.
    logits = torch.tensor([[3.0, 2.9, -1.0, 1.0, 0.5]])
    params = SamplingParams(temperature=0, repetition_penalty=1.1)
    state = SamplingState(params, prompt_token_ids=[0])
    assert Sampler([]).sample(logits, [state]).token_ids == [1]  # 3.0 / 1.1 < 2.9

    state = SamplingState(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_token_ids=[2, 0])
    captured = _processed_logits(logits, state)
    assert torch.equal(captured, torch.tensor([[1.5, 2.9, -2.0, 1.0, 0.5]]))

    state = SamplingState(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25),
                          prompt_token_ids=[4])
    for token in (0, 0, 3):
        state.record(token)
    captured = _processed_logits(logits, state)
    # token 0: 3.0 - 2*0.25 - 0.5; token 3: 1.0 - 0.25 - 0.5; prompt token 4 untouched by these two.
    assert torch.equal(captured, torch.tensor([[2.0, 2.9, -1.0, 0.25, 0.5]]))


def _processed_logits(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    processed = logits.clone()
    Sampler._penalize(processed[0], state)
    return processed


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.full((1, 10), -5.0)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 4] = 1.0
    state = SamplingState(SamplingParams(temperature=0, min_tokens=2, max_tokens=5, stop_token_ids=[7]))
    sampler = Sampler([EOS])
    assert sampler.sample(logits, [state]).token_ids == [4]
    assert sampler.sample(logits, [state]).token_ids == [4]
    assert sampler.sample(logits, [state]).token_ids == [EOS]  # two tokens generated: EOS allowed


def test_min_tokens_rows_pick_the_masked_argmax_from_one_batch_argmax():
    # the stop-masked rows take the batch's argmax unless it is banned: check against masking every row
    logits = random_logits(32, seed=5)
    stop = [11, 12]
    banned_top = [0, 5, 9]  # these rows' maxima are EOS or a stop id: they must take the edited argmax
    for row, token in zip(banned_top, (EOS, 11, 12), strict=True):
        logits[row, token] = 100.0
    logits[20, EOS] = logits[20].max() + 1.0  # a tie: EOS (index 2) and token 30 share the maximum
    logits[20, 30] = logits[20, EOS]
    params = [SamplingParams(temperature=0, min_tokens=4, stop_token_ids=stop) for _ in range(32)]
    params[7] = SamplingParams(temperature=0, min_tokens=4, repetition_penalty=1.3)
    params[8] = SamplingParams(temperature=0)
    states = states_for(params, prompts=[(1, 2, 3)] * 32)
    masked = logits.clone()
    for row, state in enumerate(states):
        if state.params.min_tokens:
            masked[row, [EOS, *state.params.stop_token_ids]] = float("-inf")
    masked[7] = _processed_logits(masked[7:8], states[7])[0]
    result = Sampler([EOS]).sample(logits, states)
    assert result.token_ids == masked.argmax(dim=-1).tolist()
    assert result.token_ids[20] == 30
    assert all(result.token_ids[row] not in (EOS, 11, 12) for row in banned_top)


def test_logprobs_are_the_raw_log_softmax():
    logits = random_logits(3)
    params = [SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.5),
              SamplingParams(temperature=0.7, logprobs=0, seed=3),
              SamplingParams(temperature=0)]
    result = Sampler([EOS]).sample(logits, states_for(params, prompts=[(1, 2, 3), (), ()]))
    log_probs = logits.log_softmax(dim=-1)
    for row in (0, 1):
        entry = result.logprobs[row]
        assert entry.token_id == result.token_ids[row]
        assert entry.logprob == pytest.approx(float(log_probs[row, entry.token_id]), abs=1e-6)
    values, ids = log_probs[0].topk(5)
    assert [t for t, _ in result.logprobs[0].top] == ids.tolist()
    assert all(math.isclose(a, b, abs_tol=1e-6) for (_, a), b in zip(result.logprobs[0].top, values.tolist(),
                                                                     strict=True))
    assert result.logprobs[1].top == () and result.logprobs[2] is None


def test_exported_state_continues_the_same_stream():
    params = SamplingParams(temperature=1.0, seed=42, frequency_penalty=0.3)
    rows = [random_logits(1, seed=step) for step in range(10)]
    sampler = Sampler([EOS])
    original = SamplingState(params, prompt_token_ids=[5, 6])
    uninterrupted = [sampler.sample(row, [original]).token_ids[0] for row in rows]

    first = SamplingState(params, prompt_token_ids=[5, 6])
    head = [sampler.sample(row, [first]).token_ids[0] for row in rows[:4]]
    moved = SamplingState.import_state(first.export_state())
    tail = [sampler.sample(row, [moved]).token_ids[0] for row in rows[4:]]
    assert head + tail == uninterrupted
    assert moved.output_counts == original.output_counts and moved.num_output_tokens == 10


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        Sampler([EOS]).sample(random_logits(2), states_for([SamplingParams()]))

"""Choosing the next token for every row of a batch.

The common case (every row greedy, no penalties, no logprobs) is one argmax over the batch. All
other rows go through: min_tokens mask -> penalties -> temperature -> top-k / top-p / min-p ->
a draw from the request's own torch.Generator. Each row's processing is row-wise (no value depends
on another row), so a seeded request draws the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.api import TokenLogprob
from engine.core.argmax import argmax_rows
from engine.sampling_params import SamplingParams


class SamplingState:
    """A request's sampling memory: its RNG and what it generated so far (for penalties)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ):
        self.params = params
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.num_output_tokens = 0
        self.output_counts: Counter[int] = Counter()  # kept only when penalties need it
        # The batch may take the single-argmax path only if every row says yes.
        self.is_plain_greedy = (
            params.is_greedy and not params.has_penalties
            and params.logprobs is None and params.min_tokens == 0
        )
        self._prompt_tensor: torch.Tensor | None = None

    def record(self, token_id: int) -> None:
        self.num_output_tokens += 1
        if self.params.has_penalties:
            self.output_counts[token_id] += 1

    @property
    def needs_stop_mask(self) -> bool:
        return self.num_output_tokens < self.params.min_tokens

    def prompt_tensor(self, device: torch.device) -> torch.Tensor:
        if self._prompt_tensor is None or self._prompt_tensor.device != device:
            self._prompt_tensor = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
        return self._prompt_tensor

    def export_state(self) -> dict[str, Any]:
        """Everything needed to continue on another replica (plain Python values and bytes)."""
        return {
            "params": self.params.to_dict(),
            "prompt_token_ids": list(self.prompt_token_ids),
            "seed": self.seed,
            "generator_state": bytes(self.generator.get_state().numpy().tobytes()),
            "num_output_tokens": self.num_output_tokens,
            "output_counts": dict(self.output_counts),
        }

    @classmethod
    def import_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> SamplingState:
        params = SamplingParams(**state["params"])
        restored = cls(params, state["prompt_token_ids"], device=device)
        restored.seed = state["seed"]
        generator_state = torch.frombuffer(bytearray(state["generator_state"]), dtype=torch.uint8)
        restored.generator.set_state(generator_state)
        restored.num_output_tokens = state["num_output_tokens"]
        restored.output_counts = Counter({int(k): v for k, v in state["output_counts"].items()})
        return restored


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int] = ()):
        self.eos_token_ids = tuple(eos_token_ids)

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleResult:
        """Pick one token per row of `logits` [B, V] (float32) and record it in that row's state.

        `logits` is not modified (it may be the runner's workspace)."""
        if len(states) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for {len(states)} sampling states")
        if all(state.is_plain_greedy for state in states):
            token_ids = argmax_rows(logits)
            for state in states:
                state.num_output_tokens += 1  # plain-greedy rows keep no counts
            return SampleResult(token_ids, [None] * len(token_ids))
        return self._sample_general(logits, states)

    def _sample_general(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleResult:
        processed = logits.float()
        if any(state.needs_stop_mask or state.params.has_penalties for state in states):
            processed = processed.clone()  # edited in place below; the caller's logits stay as they are
            self._mask_stop_tokens(processed, states)
            self._apply_penalties(processed, states)
        greedy_rows = [i for i, state in enumerate(states) if state.params.is_greedy]
        sampled_rows = [i for i, state in enumerate(states) if not state.params.is_greedy]
        if not sampled_rows:
            token_ids = processed.argmax(dim=-1)
        elif not greedy_rows:
            token_ids = self._draw(processed, states)
        else:
            token_ids = torch.empty(len(states), dtype=torch.long, device=logits.device)
            token_ids[greedy_rows] = processed[greedy_rows].argmax(dim=-1)
            token_ids[sampled_rows] = self._draw(processed[sampled_rows], [states[i] for i in sampled_rows])
        token_list = token_ids.tolist()
        for state, token_id in zip(states, token_list, strict=True):
            state.record(token_id)
        return SampleResult(token_list, self._logprobs(logits, states, token_list))

    def _mask_stop_tokens(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
        for row, state in enumerate(states):
            if state.needs_stop_mask:
                banned = [*self.eos_token_ids, *state.params.stop_token_ids]
                if banned:
                    logits[row, banned] = float("-inf")

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
        device = logits.device
        for row, state in enumerate(states):
            params = state.params
            if not params.has_penalties:
                continue
            if params.repetition_penalty != 1.0:
                output_ids = torch.tensor(list(state.output_counts), dtype=torch.long, device=device)
                seen = torch.cat((state.prompt_tensor(device), output_ids)).unique()
                values = logits[row, seen]
                logits[row, seen] = torch.where(
                    values > 0, values / params.repetition_penalty, values * params.repetition_penalty
                )
            if state.output_counts and (params.frequency_penalty != 0 or params.presence_penalty != 0):
                ids = torch.tensor(list(state.output_counts.keys()), dtype=torch.long, device=device)
                counts = torch.tensor(list(state.output_counts.values()), dtype=logits.dtype, device=device)
                logits[row, ids] -= params.frequency_penalty * counts + params.presence_penalty

    @staticmethod
    def _draw(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """One token per row, drawn with each row's own generator (rows are the non-greedy ones).

        Inverse-CDF sampling: one uniform number per row from the request's generator, located in the
        row's cumulative distribution. This costs one cumsum for the batch instead of a multinomial
        per row (which is ~1.5 ms per 49K-token row on this CPU)."""
        device = logits.device
        temperatures = torch.tensor([s.params.temperature for s in states], dtype=logits.dtype, device=device)
        probabilities = (logits / temperatures.unsqueeze(1)).softmax(dim=-1)
        filtered_rows = [i for i, s in enumerate(states) if _needs_filter(s.params)]
        if filtered_rows:
            params = [states[i].params for i in filtered_rows]
            probabilities[filtered_rows] = _filter_probabilities(probabilities[filtered_rows], params)
        cumulative = probabilities.cumsum(dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=s.generator, device=device) for s in states])
        targets = (uniforms * cumulative[:, -1]).unsqueeze(1)
        chosen = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
        # u * total can round up to the total; the row's last possible token is then the right pick.
        for row in (chosen >= probabilities.shape[1]).nonzero().flatten().tolist():
            chosen[row] = probabilities[row].nonzero().max()
        return chosen

    @staticmethod
    def _logprobs(
        raw_logits: torch.Tensor, states: Sequence[SamplingState], token_ids: list[int]
    ) -> list[TokenLogprob | None]:
        """Log-probabilities of the model's own distribution (before penalties and temperature), as
        OpenAI reports them."""
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        results: list[TokenLogprob | None] = [None] * len(states)
        if not rows:
            return results
        selected = raw_logits if len(rows) == len(states) else raw_logits[rows]
        log_probs = selected.float().log_softmax(dim=-1)
        chosen_ids = torch.tensor([token_ids[row] for row in rows], device=log_probs.device)
        chosen = log_probs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
        max_top = max(states[row].params.logprobs for row in rows)
        top_values, top_ids = log_probs.topk(max_top, dim=-1) if max_top else (None, None)
        top_values = top_values.tolist() if max_top else None
        top_ids = top_ids.tolist() if max_top else None
        for n, row in enumerate(rows):
            top_n = states[row].params.logprobs
            top = tuple(zip(top_ids[n][:top_n], top_values[n][:top_n], strict=True)) if top_n else ()
            results[row] = TokenLogprob(token_id=token_ids[row], logprob=chosen[n], top=top)
        return results
        log_probs = raw_logits[rows].float().log_softmax(dim=-1)
        for n, row in enumerate(rows):
            top_n = states[row].params.logprobs
            chosen = float(log_probs[n, token_ids[row]])
            top: tuple[tuple[int, float], ...] = ()
            if top_n:
                values, ids = log_probs[n].topk(top_n)
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            results[row] = TokenLogprob(token_id=token_ids[row], logprob=chosen, top=top)
        return results


def _needs_filter(params: SamplingParams) -> bool:
    return params.has_top_k or params.top_p < 1.0 or params.min_p > 0.0


# Top-p is decided among this many most likely tokens (a top-k, cheap) instead of sorting the
# vocabulary (~160 ms for 64 x 49K rows here); rows whose nucleus is wider fall back to a full sort.
TOP_P_CANDIDATES = 1024


def _filter_probabilities(probabilities: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero the tokens that top-k, then top-p (over the top-k renormalised), then min-p remove.

    Each filter keeps the tokens at least as likely as some threshold, so the three are combined as
    one per-row probability threshold (ties at a threshold stay in, as in HF's warpers)."""
    device = probabilities.device
    num_rows, vocab_size = probabilities.shape
    top_k = torch.tensor(
        [min(p.top_k, vocab_size) if p.has_top_k else vocab_size for p in params], device=device
    )
    top_p = torch.tensor([p.top_p for p in params], dtype=probabilities.dtype, device=device)
    min_p = torch.tensor([p.min_p for p in params], dtype=probabilities.dtype, device=device)
    uses_top_p = [p.top_p < 1.0 for p in params]
    threshold = min_p * probabilities.max(dim=-1).values
    if not any(uses_top_p) and not any(p.has_top_k for p in params):
        return probabilities.masked_fill(probabilities < threshold.unsqueeze(1), 0.0)
    num_candidates = max(int(top_k.max()), TOP_P_CANDIDATES) if any(uses_top_p) else int(top_k.max())
    num_candidates = min(num_candidates, vocab_size)
    candidates = probabilities.topk(num_candidates, dim=-1, sorted=True).values
    rows = torch.arange(num_rows, device=device)
    last_in_top_k = (top_k - 1).clamp(max=num_candidates - 1)
    top_k_threshold = candidates[rows, last_in_top_k]
    threshold = torch.where(top_k < vocab_size, torch.maximum(threshold, top_k_threshold), threshold)
    if any(uses_top_p):
        in_top_k = torch.arange(num_candidates, device=device).unsqueeze(0) < top_k.unsqueeze(1)
        candidates = candidates * in_top_k
        cumulative = candidates.cumsum(dim=-1)
        top_k_mass = torch.where(top_k < vocab_size, cumulative[rows, last_in_top_k], 1.0)
        # Keep a token while the mass of the tokens before it is below top_p of the renormalised mass.
        kept = ((cumulative - candidates) <= top_p.unsqueeze(1) * top_k_mass.unsqueeze(1)) & in_top_k
        num_kept = kept.sum(dim=-1).clamp(min=1)
        top_p_threshold = candidates[rows, num_kept - 1]
        # Every candidate kept and the top-k set (or the vocabulary) is larger: the nucleus may be too.
        too_wide = (num_kept == num_candidates) & (num_candidates < top_k) & (top_p < 1.0)
        for row in too_wide.nonzero().flatten().tolist():
            top_p_threshold[row] = _top_p_threshold_by_sorting(probabilities[row], float(top_p[row]))
        threshold = torch.where(top_p < 1.0, torch.maximum(threshold, top_p_threshold), threshold)
    return probabilities.masked_fill(probabilities < threshold.unsqueeze(1), 0.0)


def _top_p_threshold_by_sorting(row: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered = row.sort(descending=True).values
    before = ordered.cumsum(dim=0) - ordered
    num_kept = int((before <= top_p).sum().clamp(min=1))
    return ordered[num_kept - 1]

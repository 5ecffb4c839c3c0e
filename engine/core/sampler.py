"""Choosing the next token for every row of a batch.

The common case (every row greedy, no penalties, no logprobs) is one fp32 argmax over the batch. All
other rows go through: min_tokens mask -> penalties -> temperature -> top-k / top-p / min-p ->
a draw from the request's own torch.Generator. Each row's processing is row-wise (no value depends
on another row), so a seeded request draws the same tokens whatever else is in its batch.
The vocabulary-wide temporaries of those rows live in a workspace the caller passes (the runner carves
it from the step's pool-backed workspace; engine/core/sampling_workspace.py sizes it).
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
from engine.core.sampling_workspace import SampledRows, row_demand, sampling_plan
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

    def row_demand(self) -> SampledRows:
        """What this request's sampled row asks of the sampler's workspace in the coming step."""
        return row_demand(self.params, self.needs_stop_mask)

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

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState],
               workspace: torch.Tensor | None = None) -> SampleResult:
        """Pick one token per row of `logits` [B, V] (float32) and record it in that row's state.

        `logits` is not modified (it may be the runner's workspace). `workspace` is a flat uint8 tensor
        of at least `sampling_plan(rows_of(states), V).num_bytes` for the temporaries; without one they
        come from torch's allocator."""
        if len(states) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for {len(states)} sampling states")
        if all(state.is_plain_greedy for state in states):
            token_ids = argmax_rows(logits)
            for state in states:
                state.num_output_tokens += 1  # plain-greedy rows keep no counts
            return SampleResult(token_ids, [None] * len(token_ids))
        plan = sampling_plan(rows_of(states), logits.shape[1])
        if workspace is None:
            workspace = torch.empty(plan.num_bytes, dtype=torch.uint8, device=logits.device)
        return self._sample_general(logits.float(), states, plan.carve(workspace))

    def _sample_general(self, logits: torch.Tensor, states: Sequence[SamplingState],
                        buffers: dict[str, torch.Tensor]) -> SampleResult:
        token_ids = [0] * len(states)
        edited = iter(buffers["edited"])
        # one argmax over the batch; a greedy row keeps its pick unless penalties or a banned pick say otherwise
        picks = argmax_rows(logits) if any(state.params.is_greedy for state in states) else []
        for row, state in enumerate(states):
            if not state.params.is_greedy:
                continue
            if not self._pick_needs_edit(state, picks[row]):
                token_ids[row] = picks[row]
                continue
            values = next(edited)
            values.copy_(logits[row])  # edited in place; the caller's logits stay as they are
            self._edit(values, state)
            token_ids[row] = argmax_rows(values.unsqueeze(0))[0]
        drawn = [row for row, state in enumerate(states) if not state.params.is_greedy]
        if drawn:
            chosen = self._draw(logits, drawn, [states[row] for row in drawn], buffers)
            for row, token_id in zip(drawn, chosen, strict=True):
                token_ids[row] = token_id
        for state, token_id in zip(states, token_ids, strict=True):
            state.record(token_id)
        return SampleResult(token_ids, self._logprobs(logits, states, token_ids, buffers["logprobs"]))

    def _banned(self, state: SamplingState) -> list[int]:
        """The tokens min_tokens forbids this step (EOS and the stop ids), or none."""
        return [*self.eos_token_ids, *state.params.stop_token_ids] if state.needs_stop_mask else []

    def _pick_needs_edit(self, state: SamplingState, pick: int) -> bool:
        """Whether a greedy row's unedited argmax `pick` may differ from its edited row's argmax.

        Penalties move any value, so they always edit. The stop mask only lowers banned tokens to -inf: if
        the unedited argmax (the first index holding the maximum) is not banned, every index before it
        holds less and the mask cannot raise one, so the edited argmax is the same token. A banned pick
        (also one tied with an allowed token at a later index) takes the edit."""
        return state.params.has_penalties or pick in self._banned(state)

    def _edit(self, row: torch.Tensor, state: SamplingState) -> None:
        """The min_tokens stop mask, then the penalties, on one row [V] in place."""
        banned = self._banned(state)
        if banned:
            row[banned] = float("-inf")
        self._penalize(row, state)

    @staticmethod
    def _penalize(row: torch.Tensor, state: SamplingState) -> None:
        params = state.params
        if not params.has_penalties:
            return
        device = row.device
        if params.repetition_penalty != 1.0:
            output_ids = torch.tensor(list(state.output_counts), dtype=torch.long, device=device)
            seen = torch.cat((state.prompt_tensor(device), output_ids)).unique()
            values = row[seen]
            row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        if state.output_counts and (params.frequency_penalty != 0 or params.presence_penalty != 0):
            ids = torch.tensor(list(state.output_counts.keys()), dtype=torch.long, device=device)
            counts = torch.tensor(list(state.output_counts.values()), dtype=row.dtype, device=device)
            row[ids] -= params.frequency_penalty * counts + params.presence_penalty

    def _draw(self, logits: torch.Tensor, rows: list[int], states: Sequence[SamplingState],
              buffers: dict[str, torch.Tensor]) -> list[int]:
        """One token for each of `rows` (the non-greedy ones), drawn with each row's own generator.

        Inverse-CDF sampling: one uniform number per row from the request's generator, located in the
        row's cumulative distribution. This costs one cumsum for the batch instead of a multinomial
        per row (which is ~1.5 ms per 49K-token row on this CPU)."""
        device = logits.device
        tempered, probabilities = buffers["tempered"], buffers["probabilities"]
        if len(rows) == logits.shape[0]:
            tempered.copy_(logits)
        else:
            torch.index_select(logits, 0, torch.tensor(rows, device=device), out=tempered)
        for row, state in zip(tempered, states, strict=True):
            if _is_edited(state):
                self._edit(row, state)
        temperatures = torch.tensor([s.params.temperature for s in states], dtype=logits.dtype, device=device)
        tempered.div_(temperatures.unsqueeze(1))
        torch.ops.aten._softmax.out(tempered, -1, False, out=probabilities)
        for row, state in zip(probabilities, states, strict=True):
            if _needs_filter(state.params):
                _filter_row(row, state.params, buffers)
        cumulative = torch.cumsum(probabilities, dim=-1, out=tempered)  # the tempered logits are spent
        uniforms = torch.cat([torch.rand(1, generator=s.generator, device=device) for s in states])
        targets = (uniforms * cumulative[:, -1]).unsqueeze(1)
        chosen = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
        # u * total can round up to the total; the row's last possible token is then the right pick.
        for row in (chosen >= probabilities.shape[1]).nonzero().flatten().tolist():
            chosen[row] = probabilities[row].nonzero().max()
        return chosen.tolist()

    @staticmethod
    def _logprobs(logits: torch.Tensor, states: Sequence[SamplingState], token_ids: list[int],
                  out: torch.Tensor) -> list[TokenLogprob | None]:
        """Log-probabilities of the model's own distribution (before penalties and temperature), as
        OpenAI reports them; `out` [rows asking, V] receives the log_softmax rows."""
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        results: list[TokenLogprob | None] = [None] * len(states)
        if not rows:
            return results
        if len(rows) == len(states):
            torch.ops.aten._log_softmax.out(logits, -1, False, out=out)
        else:
            for n, row in enumerate(rows):
                torch.ops.aten._log_softmax.out(logits[row : row + 1], -1, False, out=out[n : n + 1])
        chosen_ids = torch.tensor([token_ids[row] for row in rows], device=out.device)
        chosen = out.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
        max_top = max(states[row].params.logprobs for row in rows)
        top_values, top_ids = out.topk(max_top, dim=-1) if max_top else (None, None)
        top_values = top_values.tolist() if max_top else None
        top_ids = top_ids.tolist() if max_top else None
        for n, row in enumerate(rows):
            top_n = states[row].params.logprobs
            top = tuple(zip(top_ids[n][:top_n], top_values[n][:top_n], strict=True)) if top_n else ()
            results[row] = TokenLogprob(token_id=token_ids[row], logprob=chosen[n], top=top)
        return results


def rows_of(states: Sequence[SamplingState]) -> SampledRows:
    """What a step's sampled rows (these states, before they record this step's token) ask for."""
    return SampledRows.of(state.row_demand() for state in states)


def _is_edited(state: SamplingState) -> bool:
    return state.needs_stop_mask or state.params.has_penalties


def _needs_filter(params: SamplingParams) -> bool:
    return params.has_top_k or params.top_p < 1.0 or params.min_p > 0.0


def _filter_row(row: torch.Tensor, params: SamplingParams, buffers: dict[str, torch.Tensor]) -> None:
    """Zeroes, in place, the tokens of one probability row [V] that top-k, then top-p (over the top-k
    renormalised), then min-p remove, using the step's filter scratch.

    Each filter keeps the tokens at least as likely as some threshold, so the three are combined as
    one probability threshold (ties at a threshold stay in, as in HF's warpers)."""
    vocab_size = row.shape[0]
    mask = buffers["mask"]
    threshold = torch.tensor(params.min_p, dtype=row.dtype, device=row.device) * row.max()
    top_k = min(params.top_k, vocab_size) if params.has_top_k else vocab_size
    if top_k < vocab_size or params.top_p < 1.0:
        candidates, ids = buffers["candidates"][:top_k], buffers["candidate_ids"][:top_k]
        torch.topk(row, top_k, sorted=True, out=(candidates, ids))
        if top_k < vocab_size:
            threshold = torch.maximum(threshold, candidates[top_k - 1])
        if params.top_p < 1.0:
            sums = torch.cumsum(candidates, dim=0, out=buffers["candidate_sums"][:top_k])
            mass = sums[top_k - 1] if top_k < vocab_size else torch.tensor(1.0, dtype=row.dtype, device=row.device)
            bound = torch.tensor(params.top_p, dtype=row.dtype, device=row.device) * mass
            # keep a token while the mass of the tokens before it is within top_p of the renormalised mass
            kept = torch.le(sums.sub_(candidates), bound, out=mask[:top_k])
            num_kept = max(int(kept.sum()), 1)
            threshold = torch.maximum(threshold, candidates[num_kept - 1])
    row.masked_fill_(torch.lt(row, threshold, out=mask), 0.0)

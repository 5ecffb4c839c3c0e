"""Hugging Face transformers `generate` as the in-process baseline of the offline benchmark.

The model is transformers' own class for the architecture, holding the tensors our loader produces
(the engine's exactness tests show they equal transformers' GGUF tensors), in the engine's dtype and
under the same torch thread count. Batches are static: every prompt of a batch starts together and the
batch ends when its longest request does (min_new_tokens = max_new_tokens, so all end together).
A streamer timestamps every step, which splits the prefill step from the decode steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from engine.weights import ModelSource, load_weights


def hf_model(source: ModelSource, dtype: torch.dtype, loaded=None) -> PreTrainedModel:
    """transformers' model for `source`'s architecture filled with our loader's tensors (no copy);
    `loaded=load_weights(...)` reuses tensors already in memory."""
    config, weights = loaded if loaded is not None else load_weights(source, dtype=dtype, show_progress=False)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_hf_config()), dtype=dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


class _StepClock(BaseStreamer):
    """Records when each generation step hands its tokens out (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._saw_prompt = False

    def put(self, value) -> None:
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, prompts: Sequence[Sequence[int]], output_len: int, pad_token_id: int
                   ) -> tuple[float, list[float], list[list[int]]]:
    """One static batch: (start time, time of each step's tokens, generated ids per prompt). Left padded."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    clock = _StepClock()
    started = time.perf_counter()
    generated = model.generate(
        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=output_len,
        min_new_tokens=output_len, top_k=None, top_p=None, temperature=None, pad_token_id=pad_token_id,
        streamer=clock,
    )
    return started, clock.times, generated[:, width:].tolist()


def run_hf(model: PreTrainedModel, prompts: Sequence[Sequence[int]], output_len: int, pad_token_id: int,
           batch_size: int | None = None) -> dict:
    """The workload in static batches of `batch_size` (None: all at once), one batch after another."""
    batch_size = batch_size or len(prompts)
    prefill_s = decode_s = 0.0
    num_decode_steps = 0
    wall_started = time.perf_counter()
    ttfts = []
    token_ids: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        started, times, generated = generate_batch(model, batch, output_len, pad_token_id)
        token_ids.extend(generated)
        prefill_s += times[0] - started
        ttfts.append(times[0] - wall_started)
        decode_s += times[-1] - times[0]
        num_decode_steps += len(times) - 1
    wall_s = time.perf_counter() - wall_started
    num_prompt_tokens = sum(len(prompt) for prompt in prompts)
    num_steps = num_decode_steps + -(-len(prompts) // batch_size)
    return {
        "wall_s": wall_s,
        "output_tok_s": len(prompts) * output_len / wall_s,
        "prefill_tok_s": num_prompt_tokens / prefill_s if prefill_s else None,
        "mean_step_ms": wall_s / num_steps * 1e3,
        "mean_decode_step_ms": decode_s / num_decode_steps * 1e3 if num_decode_steps else None,
        "ttft_ms": ttfts[0] * 1e3,
        "num_steps": num_steps,
        "batch_size": batch_size,
        "token_ids": token_ids,
    }

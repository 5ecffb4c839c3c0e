"""Turning a stream of token ids into a stream of text, one step at a time.

Two things make this harder than decoding each token:
- a token may end in the middle of a UTF-8 character (emoji, CJK are several byte-level tokens),
  and SentencePiece tokens only know their leading space in context. So each step decodes a small
  window of recent tokens twice, with and without the new ones, and emits the difference; the window
  only moves past tokens whose text is complete (it does not end in U+FFFD). This is the
  prefix/read-offset scheme popularised by vLLM and text-generation-inference.
- stop strings can span tokens. Text that could still become a stop string is held back, and the
  output is cut where a stop string begins (the stop string itself is never sent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Prompt tokens kept as decoding context for the first output tokens (leading spaces, merges).
NUM_CONTEXT_TOKENS = 5
REPLACEMENT_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class DetokenizerStep:
    text_delta: str  # new text safe to send to the client
    stop_reached: bool  # a stop string was found; the request should finish with reason "stop"
    matched_stop: str | None = None  # which stop string, when stop_reached


class IncrementalDetokenizer:
    """Per-request text state. Feed every sampled token once, in order, through `step`.

    Tokens that end a request by id (EOS, stop_token_ids) are best not fed: with
    skip_special_tokens they decode to nothing anyway, and OpenAI does not return them."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.output_text = ""  # everything decoded so far (cut at the stop string once found)
        self.num_emitted_chars = 0  # prefix of output_text already returned as deltas
        self.stop_reached = False
        self.matched_stop: str | None = None
        # Decoding window: window[:read_offset] is text already accounted for (context), the rest
        # is tokens whose text is not complete yet.
        self._window: list[int] = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        self._read_offset = len(self._window)
        self._context_text: str | None = None  # cache of decode(window[:read_offset])
        self._decode_ids = self._pick_decoder(tokenizer)

    def _pick_decoder(self, tokenizer: Any):
        # The Rust backend directly: transformers' decode() adds ~10 us of Python per call, and its
        # clean_up_tokenization_spaces would make the text depend on where the window starts.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return lambda ids: backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return lambda ids: tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    @property
    def emitted_text(self) -> str:
        return self.output_text[: self.num_emitted_chars]

    def step(self, new_token_ids: Sequence[int], is_last: bool = False) -> DetokenizerStep:
        """Add tokens; return the text that became safe to send. `is_last=True` (the request ends for
        another reason: length, EOS) also sends held-back text and any incomplete character."""
        if self.stop_reached:
            return DetokenizerStep("", True, self.matched_stop)
        length_before = len(self.output_text)
        pieces = [self._decode_next(token_id) for token_id in new_token_ids]
        if is_last:
            pieces.append(self._decode_rest())
        self.output_text += "".join(pieces)
        # A stop string ending in the new text may start inside the text held back before it.
        longest_stop = max((len(s) for s in self.stop), default=0)
        return self._emit(search_from=max(0, length_before - longest_stop + 1), is_last=is_last)

    def _context(self) -> str:
        if self._context_text is None:
            self._context_text = self._decode_ids(self._window[: self._read_offset])
        return self._context_text

    def _decode_next(self, token_id: int) -> str:
        self._window.append(token_id)
        context = self._context()
        text = self._decode_ids(self._window)
        if len(text) <= len(context) or text.endswith(REPLACEMENT_CHARACTER):
            return ""  # nothing new, or a character cut in half: wait for the next token
        # The tokens just read become the next context; older ones are no longer needed.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._context_text = None
        return text[len(context):]

    def _decode_rest(self) -> str:
        if self._read_offset == len(self._window):
            return ""
        context = self._context()
        text = self._decode_ids(self._window)
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._context_text = None
        return text[len(context):]

    def _emit(self, search_from: int, is_last: bool) -> DetokenizerStep:
        text = self.output_text
        stop_at, matched = -1, None
        for stop in self.stop:
            index = text.find(stop, search_from)
            if index >= 0 and (stop_at < 0 or index < stop_at):
                stop_at, matched = index, stop
        if matched is not None:
            self.output_text = text[:stop_at]
            self.stop_reached, self.matched_stop = True, matched
            return DetokenizerStep(self._take(stop_at), True, matched)
        hold = 0 if is_last else self._num_chars_to_hold(text)
        return DetokenizerStep(self._take(len(text) - hold), False)

    def _take(self, end: int) -> str:
        end = max(end, self.num_emitted_chars)
        delta = self.output_text[self.num_emitted_chars: end]
        self.num_emitted_chars = end
        return delta

    def _num_chars_to_hold(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string begins with."""
        hold = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:length]):
                    hold = length
                    break
        return hold

    # --- migration ---------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Plain values that let another replica continue this stream exactly where it stands."""
        return {
            "window": list(self._window),
            "read_offset": self._read_offset,
            "output_text": self.output_text,
            "num_emitted_chars": self.num_emitted_chars,
            "stop": list(self.stop),
            "skip_special_tokens": self.skip_special_tokens,
            "stop_reached": self.stop_reached,
            "matched_stop": self.matched_stop,
        }

    @classmethod
    def from_state(cls, tokenizer: Any, state: dict[str, Any]) -> IncrementalDetokenizer:
        restored = cls(tokenizer, (), state["skip_special_tokens"], state["stop"])
        restored._window = list(state["window"])
        restored._read_offset = state["read_offset"]
        restored.output_text = state["output_text"]
        restored.num_emitted_chars = state["num_emitted_chars"]
        restored.stop_reached = state["stop_reached"]
        restored.matched_stop = state["matched_stop"]
        return restored

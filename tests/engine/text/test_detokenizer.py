"""Incremental detokenization with SmolLM2's byte-level BPE tokenizer: multi-byte characters split
across tokens, stop strings across tokens, special tokens, and migration mid-stream."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.text.detokenizer import REPLACEMENT_CHARACTER, IncrementalDetokenizer

MULTI_BYTE_TEXT = "Hi 🎉! 你好世界, naïve café 👩‍👩‍👧 ok"


def stream(detokenizer: IncrementalDetokenizer, token_ids, chunk_sizes=None, finish=True):
    """Feed tokens in chunks; return the deltas and the step that reported the stop (or None)."""
    chunk_sizes = chunk_sizes or [1] * len(token_ids)
    deltas, position, stopped_at = [], 0, None
    for size in chunk_sizes:
        chunk = token_ids[position: position + size]
        position += size
        is_last = finish and position >= len(token_ids)
        result = detokenizer.step(chunk, is_last=is_last)
        deltas.append(result.text_delta)
        if result.stop_reached:
            stopped_at = len(deltas) - 1
            break
        if position >= len(token_ids):
            break
    return deltas, stopped_at


def test_multi_byte_characters_are_never_split(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTI_BYTE_TEXT)
    pieces = [smollm2_tokenizer.decode([i]) for i in ids]
    assert any(REPLACEMENT_CHARACTER in p for p in pieces)  # the test needs split characters
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, smollm2_tokenizer.encode("Say: "))
    deltas, _ = stream(detokenizer, ids, finish=False)
    assert not any(REPLACEMENT_CHARACTER in d for d in deltas)
    assert "".join(deltas) == MULTI_BYTE_TEXT == detokenizer.output_text


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(smollm2_tokenizer):
    text = "The answer is 42.\n\nUser: next question"
    ids = smollm2_tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["\nUser:"])
    deltas, stopped_at = stream(detokenizer, ids)
    assert stopped_at is not None and detokenizer.stop_reached and detokenizer.matched_stop == "\nUser:"
    assert "".join(deltas) == "The answer is 42.\n" == detokenizer.output_text
    # Before the stop completed, its start ("\n") was held back, not sent.
    assert all("User" not in d for d in deltas)
    assert detokenizer.step(smollm2_tokenizer.encode(" more")).text_delta == ""


def test_stop_string_inside_a_multi_byte_run(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTI_BYTE_TEXT)
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["世界"])
    deltas, _ = stream(detokenizer, ids)
    assert "".join(deltas) == "Hi 🎉! 你好"


def test_partial_stop_is_held_then_released_when_it_does_not_complete(smollm2_tokenizer):
    text = "one\ntwo\nthree"
    ids = smollm2_tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["\n\n"])
    emitted = ""
    for token in ids:
        emitted += detokenizer.step([token]).text_delta
        assert not emitted.endswith("\n")  # a lone "\n" could still become "\n\n"
    assert emitted == text


def test_is_last_flushes_held_text(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("done\n")
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["\n\n"])
    held = "".join(detokenizer.step([t]).text_delta for t in ids)
    assert held == "done"
    final = detokenizer.step([], is_last=True)
    assert (final.text_delta, final.stop_reached) == ("\n", False)


def test_is_last_sends_an_incomplete_character_as_decode_does(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("ok 🎉")[:-1]  # cut inside the emoji's bytes
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [])
    deltas, _ = stream(detokenizer, ids)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(smollm2_tokenizer, skip):
    ids = smollm2_tokenizer.encode("Hello<|im_end|>\n<|im_start|>assistant")
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [], skip_special_tokens=skip)
    text = "".join(stream(detokenizer, ids)[0])
    assert text == ("Hello\nassistant" if skip else "Hello<|im_end|>\n<|im_start|>assistant")


def test_context_from_the_prompt_keeps_the_leading_space(smollm2_tokenizer):
    prompt = smollm2_tokenizer.encode("Hello")
    ids = smollm2_tokenizer.encode("Hello world")[len(prompt):]
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt)
    assert "".join(stream(detokenizer, ids)[0]) == " world"


def test_migration_mid_stream_continues_exactly(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTI_BYTE_TEXT + " END tail")
    stop = ["END"]
    prompt = smollm2_tokenizer.encode("Q: ")
    whole = "".join(stream(IncrementalDetokenizer(smollm2_tokenizer, prompt, stop=stop), ids)[0])
    for cut in range(1, len(ids)):
        first = IncrementalDetokenizer(smollm2_tokenizer, prompt, stop=stop)
        head = "".join(first.step([t]).text_delta for t in ids[:cut])
        moved = IncrementalDetokenizer.from_state(smollm2_tokenizer, json.loads(json.dumps(first.export_state())))
        tail = "".join(stream(moved, ids[cut:])[0]) if not first.stop_reached else ""
        assert head + tail == whole == MULTI_BYTE_TEXT + " "


ALPHABET = st.sampled_from(list("ab \n.,xyz") + ["é", "你", "好", "🎉", "👍", "ß", "\u200d"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(ALPHABET, min_size=1, max_size=30).map("".join),
       stop=st.lists(ALPHABET, min_size=1, max_size=4).map("".join),
       chunking=st.lists(st.integers(1, 4), min_size=40, max_size=40))
def test_streamed_text_is_the_decoded_text_cut_at_the_stop(smollm2_tokenizer, text, stop, chunking):
    ids = smollm2_tokenizer.encode(text)
    full = smollm2_tokenizer.decode(ids)
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [], stop=[stop])
    emitted = ""
    position = 0
    for size in chunking:
        chunk = ids[position: position + size]
        position += size
        result = detokenizer.step(chunk, is_last=position >= len(ids))
        emitted += result.text_delta
        assert REPLACEMENT_CHARACTER not in result.text_delta or REPLACEMENT_CHARACTER in full
        # Nothing past the first stop occurrence is ever sent, even before the stop completes.
        cut = full.find(stop)
        assert emitted == full[: len(emitted)] and (cut < 0 or len(emitted) <= cut)
        if result.stop_reached or position >= len(ids):
            break
    cut = full.find(stop)
    assert emitted == (full if cut < 0 else full[:cut])
    assert detokenizer.stop_reached == (cut >= 0)

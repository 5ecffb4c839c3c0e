from __future__ import annotations

import json

import pytest

from loadtest.openai_stream import RequestOptions, StreamTimer, chunk_text, request_body


def sse(payload) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def completion_chunk(text, finish=None):
    return sse({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def chat_chunk(delta, finish=None):
    return sse({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE = sse({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
DONE = b"data: [DONE]\n\n"


def test_request_bodies_force_output_length_and_ask_for_usage():
    options = RequestOptions(model="m")
    body = request_body("completions", "hi", [{"role": "user", "content": "hi"}], 64, options)
    assert body == {
        "model": "m",
        "max_tokens": 64,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt": "hi",
        "ignore_eos": True,
        "min_tokens": 64,
    }
    chat = request_body("chat", "hi", [{"role": "user", "content": "hi"}], 8, RequestOptions("m", False))
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert "prompt" not in chat and "ignore_eos" not in chat and "min_tokens" not in chat
    with pytest.raises(ValueError):
        request_body("embeddings", "hi", [], 8, options)
    with pytest.raises(ValueError):
        RequestOptions(model="")


def test_chunk_text_for_both_endpoints():
    assert chunk_text({"choices": [{"text": "a"}]}) == "a"
    assert chunk_text({"choices": [{"delta": {"content": "b"}}]}) == "b"
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_text({"choices": [], "usage": {}}) == ""
    assert chunk_text({"choices": [{"delta": {}}]}) == ""


def test_completion_stream_times_tokens_and_reads_usage():
    timer = StreamTimer("r1", "completions", start_time=50.0, num_requested_output_tokens=3)
    assert timer.feed(completion_chunk(" a"), 0.25) == [0.25]
    # two chunks in one read arrive together; a split event is completed by the next read
    assert timer.feed(completion_chunk(" b") + completion_chunk(" c")[:10], 0.5) == [0.5]
    assert timer.feed(completion_chunk(" c")[10:] + completion_chunk("", "length"), 0.75) == [0.75]
    assert timer.feed(USAGE + DONE, 0.875) == []
    record = timer.finish(1.0)
    assert record.is_ok and timer.text == " a b c"
    assert record.ttft_s == 0.25 and record.token_times_s == (0.25, 0.5, 0.75) and record.e2e_s == 1.0
    assert (record.num_prompt_tokens, record.num_output_tokens, record.is_usage_reported) == (12, 3, True)
    assert record.tpot_s == 0.375 and record.start_time == 50.0 and record.status_code == 200


def test_chat_role_chunk_does_not_start_the_ttft_clock():
    timer = StreamTimer("r2", "chat", 0.0, 2)
    assert timer.feed(chat_chunk({"role": "assistant", "content": ""}), 0.125) == []
    assert timer.feed(chat_chunk({"content": "x"}), 0.5) == [0.5]
    timer.feed(chat_chunk({"content": "y"}) + chat_chunk({}, "length") + DONE, 0.625)
    record = timer.finish(0.625)
    assert record.ttft_s == 0.5 and record.num_output_tokens == 2
    assert not record.is_usage_reported and record.num_prompt_tokens is None  # no usage: chunks counted


def test_error_event_mid_stream_fails_the_request_and_ignores_the_rest():
    timer = StreamTimer("r3", "completions", 0.0, 4)
    timer.feed(completion_chunk(" a"), 0.1)
    timer.feed(sse({"error": {"message": "KV cache exhausted", "type": "server_error"}}), 0.2)
    assert timer.feed(completion_chunk(" b") + DONE, 0.3) == []
    record = timer.finish(0.3)
    assert record.error == "stream error: KV cache exhausted" and not record.is_ok


def test_missing_done_and_malformed_chunks_are_errors():
    timer = StreamTimer("r4", "completions", 0.0, 1)
    timer.feed(completion_chunk(" a"), 0.1)
    assert timer.finish(0.2).error == "stream ended without data: [DONE]"
    timer = StreamTimer("r5", "completions", 0.0, 1)
    timer.feed(b"data: {not json\n\n", 0.1)
    assert timer.finish(0.2).error.startswith("malformed chunk")


def test_unterminated_done_at_close_still_counts():
    timer = StreamTimer("r6", "completions", 0.0, 1)
    timer.feed(completion_chunk(" a") + b"data: [DONE]", 0.1)
    assert timer.finish(0.2).is_ok


def test_transport_error_is_kept_with_status():
    timer = StreamTimer("r7", "completions", 0.0, 1, pool="burst", session_id="s", turn=2)
    record = timer.finish(0.5, error="HTTP 503: overloaded", status_code=503)
    assert (record.error, record.status_code, record.pool, record.session_id, record.turn) == (
        "HTTP 503: overloaded",
        503,
        "burst",
        "s",
        2,
    )
    assert record.ttft_s is None and record.num_output_tokens == 0

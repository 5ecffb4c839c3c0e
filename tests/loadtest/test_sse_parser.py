from __future__ import annotations

import pytest

from loadtest.sse import SseEvent, SseParser

OPENAI_STREAM = (
    b'data: {"choices": [{"text": "Hel"}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"choices": [{"text": "lo \xc3\xa9t\xc3\xa9"}]}\n\n'
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
    b"data: [DONE]\n\n"
)


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[SseEvent]:
    parser = SseParser()
    events = []
    previous = 0
    for cut in [*cuts, len(data)]:
        events.extend(parser.feed(data[previous:cut]))
        previous = cut
    events.extend(parser.close())
    return events


def test_whole_stream_gives_four_events_and_done():
    events = feed_in_pieces(OPENAI_STREAM, [])
    assert [event.data for event in events] == [
        '{"choices": [{"text": "Hel"}]}',
        '{"choices": [{"text": "lo été"}]}',
        '{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}',
        "[DONE]",
    ]
    assert [event.is_done for event in events] == [False, False, False, True]
    assert events[1].json() == {"choices": [{"text": "lo été"}]}
    assert all(event.event == "message" and event.error is None for event in events)


@pytest.mark.parametrize("line_break", [b"\n", b"\r\n", b"\r"])
def test_every_split_point_and_line_ending_gives_the_same_events(line_break):
    data = OPENAI_STREAM.replace(b"\n", line_break)
    expected = feed_in_pieces(data, [])
    assert len(expected) == 4
    for cut in range(1, len(data)):
        assert feed_in_pieces(data, [cut]) == expected, f"split at byte {cut}"
    assert feed_in_pieces(data, list(range(1, len(data)))) == expected  # one byte at a time


def test_crlf_split_between_cr_and_lf_makes_no_extra_blank_line():
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []  # LF completes the first break; no dispatch yet
    assert parser.feed(b"\n\r\n") == [SseEvent(data="a\nb")]


def test_multi_line_data_is_joined_with_newlines():
    events = feed_in_pieces(b"data: first\ndata:second\ndata:  third\n\n", [])
    assert events == [SseEvent(data="first\nsecond\n third")]  # only one leading space is dropped


def test_comments_and_unknown_fields_are_ignored_and_empty_events_not_dispatched():
    events = feed_in_pieces(b": ping\n\nfoo: bar\n\n:another\nretry: 3000\nid: 7\ndata: x\n\n", [])
    assert events == [SseEvent(data="x", id="7", retry_ms=3000)]


def test_event_type_and_id_persistence():
    events = feed_in_pieces(b"event: error\nid: 1\ndata: {}\n\ndata: y\n\n", [])
    assert events[0].event == "error" and events[0].id == "1"
    assert events[1].event == "message" and events[1].id == "1"  # id persists, event type does not


def test_error_payload_is_an_error_event():
    events = feed_in_pieces(b'data: {"error": {"message": "boom", "type": "x", "code": 500}}\n\n', [])
    assert events[0].error == {"message": "boom", "type": "x", "code": 500}
    assert not events[0].is_done


def test_error_event_type_with_plain_text_and_string_error():
    events = feed_in_pieces(b'event: error\ndata: overloaded\n\ndata: {"error": "flat"}\n\n', [])
    assert events[0].error == {"message": "overloaded"}
    assert events[1].error == {"message": "flat"}


def test_ordinary_chunks_and_done_are_not_errors():
    assert SseEvent(data='{"choices": []}').error is None
    assert SseEvent(data="[DONE]", event="error").error is None
    assert SseEvent(data="not json").error is None


def test_close_dispatches_an_unterminated_last_event():
    parser = SseParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.close() == [SseEvent(data="[DONE]")]


def test_utf8_character_split_across_chunks_and_bom_at_start():
    data = "\ufeffdata: café\n\n".encode()
    cut = data.index(b"\xc3") + 1  # between the two bytes of "é"
    assert feed_in_pieces(data, [1, cut]) == [SseEvent(data="café")]


def test_field_without_colon_and_data_without_value():
    assert feed_in_pieces(b"data\n\n", []) == [SseEvent(data="")]
    assert feed_in_pieces(b"data:\ndata:\n\n", []) == [SseEvent(data="\n")]


def test_accepts_str_chunks():
    parser = SseParser()
    assert parser.feed("data: a\n\n") == [SseEvent(data="a")]

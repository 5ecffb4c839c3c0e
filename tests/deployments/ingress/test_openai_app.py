"""The OpenAI HTTP layer over a fake engine: responses, streams, n>1, logprobs, models, memory, health."""

from __future__ import annotations

from deployments.ingress.openai_app import REPLICA_HEADER
from tests.deployments.conftest import sse_events, sse_json
from tests.deployments.fake_engine import FakeEngine, FakeTokenizer

TOKENIZER = FakeTokenizer()


def expected_text(engine: FakeEngine, prompt_ids, num_tokens: int) -> str:
    return TOKENIZER.decode(engine.output_ids(prompt_ids, num_tokens))


def chat_prompt_ids(messages) -> list[int]:
    return TOKENIZER.encode(TOKENIZER.apply_chat_template(messages), add_special_tokens=False)


def test_completion_returns_the_engine_tokens_and_usage(client, engine):
    response = client.post("/v1/completions", json={"model": "fake-model", "prompt": "Hello",
                                                     "max_tokens": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt_ids = TOKENIZER.encode("Hello")
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": expected_text(engine, prompt_ids, 5), "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                             "total_tokens": len(prompt_ids) + 5}
    assert response.headers[REPLICA_HEADER] == "replica-under-test"
    [request] = engine.submitted
    assert request.prompt_token_ids == tuple(prompt_ids)
    assert request.sampling.max_tokens == 5 and request.sampling.n == 1
    assert request.request_id == body["id"] + "-0"


def test_completion_accepts_token_ids_and_a_single_item_list(client, engine):
    ids = [1, 70, 71, 72]
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 3}).json()
    nested = client.post("/v1/completions", json={"prompt": [ids], "max_tokens": 3}).json()
    by_text = client.post("/v1/completions", json={"prompt": ["Hi"], "max_tokens": 3}).json()
    assert by_ids["choices"][0]["text"] == expected_text(engine, ids, 3) == nested["choices"][0]["text"]
    assert by_text["choices"][0]["text"] == expected_text(engine, TOKENIZER.encode("Hi"), 3)
    assert engine.submitted[0].prompt_token_ids == tuple(ids)


def test_default_model_name_and_sampling_knobs_reach_the_engine(client, engine):
    response = client.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
        "min_tokens": 2, "ignore_eos": True, "stop": "zz", "stop_token_ids": [9],
        "skip_special_tokens": False, "user": "u1", "logit_bias": {}, "some_future_field": 1})
    assert response.status_code == 200, response.text
    sampling = engine.submitted[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p, sampling.seed) == (
        0.5, 0.9, 5, 0.1, 7)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (
        0.5, 0.25, 1.1)
    assert (sampling.min_tokens, sampling.ignore_eos, sampling.stop, sampling.stop_token_ids) == (
        2, True, ("zz",), (9,))
    assert sampling.skip_special_tokens is False and sampling.logprobs is None
    assert engine.submitted[0].priority == 0


def test_priority_reaches_the_engine_like_vllm(client, engine):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        response = client.post(path, json={**body, "max_tokens": 2, "priority": -2})
        assert response.status_code == 200, response.text
    assert [request.priority for request in engine.submitted] == [-2, -2]


def test_chat_renders_the_template_and_answers_as_assistant(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    response = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": messages,
                                                          "max_tokens": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt_ids = chat_prompt_ids(messages)
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant",
                                                        "content": expected_text(engine, prompt_ids, 6)},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6,
                             "total_tokens": len(prompt_ids) + 6}
    assert engine.submitted[0].prompt_token_ids == tuple(prompt_ids)


def test_chat_content_parts_are_joined_text(client, engine):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                              "max_tokens": 2})
    assert engine.submitted[0].prompt_token_ids == tuple(chat_prompt_ids([{"role": "user",
                                                                          "content": "Hi\nthere"}]))


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client, engine):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    num_prompt = len(chat_prompt_ids([{"role": "user", "content": "Hi"}]))
    assert response.status_code == 200
    assert engine.submitted[0].sampling.max_tokens == engine.max_model_len - num_prompt
    completion = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "max_completion_tokens": 3})
    assert completion.json()["usage"]["completion_tokens"] == 3


def test_eos_and_stop_strings_finish_with_stop(client):
    eos = client.post("/v1/completions", json={"prompt": "EOS now", "max_tokens": 10}).json()
    assert eos["choices"][0]["finish_reason"] == "stop"
    assert eos["usage"]["completion_tokens"] == 4


def test_completion_stream_is_sse_ending_with_done(client, engine):
    with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 4,
                                                          "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = sse_json(body)
    assert len(chunks) == 4
    assert all(chunk["object"] == "text_completion" and "usage" not in chunk for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected_text(
        engine, TOKENIZER.encode("Hello"), 4)
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, None, "length"]


def test_stream_include_usage_sends_a_final_usage_chunk(client):
    response = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    chunks = sse_json(response.text)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


def test_chat_stream_role_then_content_then_finish(client, engine):
    messages = [{"role": "user", "content": "Hi"}]
    response = client.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert sse_events(response.text)[-1] == "[DONE]"
    chunks = sse_json(response.text)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[1:-2])
    assert content == expected_text(engine, chat_prompt_ids(messages), 3)
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    num_prompt = len(chat_prompt_ids(messages))
    assert chunks[-1]["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 3,
                                   "total_tokens": num_prompt + 3}


def test_n_choices_are_engine_requests_of_one_prompt_group_merged(client, engine):
    response = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "n": 3, "seed": 10})
    body = response.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert [request.request_id for request in engine.submitted] == [f"{body['id']}-{i}" for i in range(3)]
    assert [request.sampling.seed for request in engine.submitted] == [10, 11, 12]
    assert all(request.sampling.n == 1 for request in engine.submitted)
    # one prompt group: the engine prefills the prompt once and forks its KV for each choice
    assert [request.prompt_group for request in engine.submitted] == [body["id"]] * 3
    assert body["usage"]["completion_tokens"] == 9
    stream = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 2, "stream": True})
    chunks = sse_json(stream.text)
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
                if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 1})
    assert engine.submitted[-1].prompt_group is None  # a single choice is a request on its own


def test_completion_logprobs(client):
    body = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "logprobs": 2}).json()
    logprobs = body["choices"][0]["logprobs"]
    text = body["choices"][0]["text"]
    assert "".join(logprobs["tokens"]) == text
    assert logprobs["token_logprobs"] == [-0.5, -0.5]
    assert [len(top) for top in logprobs["top_logprobs"]] == [2, 2]
    assert logprobs["text_offset"] == [0, 1]


def test_chat_logprobs(client):
    body = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True,
        "top_logprobs": 3}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["logprob"] for entry in content] == [-0.5, -0.5]
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert [len(entry["top_logprobs"]) for entry in content] == [3, 3]


def test_models_memory_health_and_cluster(make_client, engine):
    async def cluster_view():
        return {"replicas": {"a": {}}}

    client = make_client(engine, served_model_name="my-model", cluster_view=cluster_view)
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(card["id"], card["object"], card["max_model_len"]) for card in models["data"]] == [
        ("my-model", "model", 256)]
    memory = client.get("/v1/memory").json()
    assert memory["replica"] == "replica-under-test"
    assert memory["ranks"][0]["chunks_per_client"] == {"kv": 0, "activations": 2}
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/cluster").json() == {"replicas": {"a": {}}}
    served = client.post("/v1/completions", json={"model": "my-model", "prompt": "x", "max_tokens": 1})
    assert served.status_code == 200


def test_health_is_503_when_the_engine_is_dead_or_loading(make_client, engine):
    engine.is_dead = True
    assert make_client(engine).get("/health").status_code == 503
    loading = make_client(None, served_model_name="m")
    assert loading.get("/health").json() == {"status": "loading"}


def test_server_default_sampling_fills_only_what_the_request_leaves_out(make_client, engine):
    client = make_client(engine, default_sampling={"temperature": 0.2, "top_p": 0.9})
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    first, second = (request.sampling for request in engine.submitted)
    assert (first.temperature, first.top_p) == (0.2, 0.9)
    assert (second.temperature, second.top_p) == (0.0, 0.9)

"""Two models from one replica's pool behind the OpenAI app: `models:` in the app's args builds an EngineGroup
(a tiny random Qwen3 and a tiny random Gemma 3 in one ElasticPool, stepped by one AsyncEngine); the request's
`model` field routes (each model's greedy text is transformers'), no model means the first listed, an
unknown one gets an OpenAI-shaped 404 `model_not_found`; /v1/models lists both, /metrics labels the
engine's series per model, /v1/memory shows every KV kind of the shared pool."""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.args import AppArgs
from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.openai_app import AppSettings, build_openai_app
from deployments.server import build_engine
from engine.async_engine import AsyncEngine
from engine.core.engine_group import EngineGroup
from engine.model.config import FULL_ATTENTION as F
from engine.model.config import SLIDING_ATTENTION as S
from engine.text.tokenizer import load_tokenizer
from tests.engine.reference import hf_greedy, hf_model_from_weights, make_tiny_random_checkpoint

PROMPT = [504, 3575, 282, 4649, 314, 1604, 3987]
NUM_NEW = 6


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-models")
    qwen = make_tiny_random_checkpoint(root / "tiny-qwen3", arch="qwen3")
    gemma = make_tiny_random_checkpoint(root / "tiny-gemma3", arch="gemma3", layer_types=(S, S, F, S, F),
                                        sliding_window=40)
    return {path.name: path for path in (qwen, gemma)}


@pytest.fixture(scope="module")
def app_client(tiny_models):
    args = AppArgs(models=[str(path) for path in tiny_models.values()], dtype="float32", device="cpu",
                   device_memory="256MiB", host_buffer="16MiB", num_threads=2,
                   engine_options={"max_model_len": 128, "max_num_seqs": 4, "tokens_per_page": 16})
    engine = build_engine(args).engine  # the replica's own path: an AsyncEngine over an EngineGroup
    assert isinstance(engine, AsyncEngine) and isinstance(engine.engine, EngineGroup)
    engine.start_thread()
    app = build_openai_app(lambda: engine, AppSettings(replica_id="two-models",
                                                       bindings=EngineBindings.from_engine_package()))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine
    engine.stop_thread()


def expected_text(path, tokenizer) -> str:
    tokens = hf_greedy(hf_model_from_weights(str(path), dtype=torch.float32), [PROMPT], NUM_NEW)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_the_model_field_routes_and_unknown_models_get_404(app_client, tiny_models):
    client, engine = app_client
    tokenizer = load_tokenizer(None)
    assert engine.model_names == ("tiny-qwen3", "tiny-gemma3") and not engine.supports_migration
    listed = client.get("/v1/models").json()["data"]
    assert [card["id"] for card in listed] == ["tiny-qwen3", "tiny-gemma3"]
    assert [card["max_model_len"] for card in listed] == [128, 128]
    texts = {}
    for model in (*tiny_models, None):
        body = {"prompt": PROMPT, "max_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}
        response = client.post("/v1/completions", json=body if model is None else {**body, "model": model})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == (model or "tiny-qwen3")
        texts[model] = response.json()["choices"][0]["text"]
    for model, path in tiny_models.items():
        assert texts[model] == expected_text(path, tokenizer), model
    assert texts[None] == texts["tiny-qwen3"] != texts["tiny-gemma3"]

    unknown = client.post("/v1/chat/completions", json={"model": "gpt-5", "messages": [{"role": "user",
                                                                                        "content": "hi"}]})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "The model `gpt-5` does not exist.",
                                        "type": "invalid_request_error", "param": "model",
                                        "code": "model_not_found"}}


@pytest.mark.slow  # CI time (10 s): routing by model stays in the default suite
def test_metrics_are_per_model_and_memory_shows_every_kv_kind(app_client):
    client, engine = app_client
    client.post("/v1/completions", json={"model": "tiny-gemma3", "prompt": PROMPT, "max_tokens": 2})
    # the engine refreshes its stats after it has delivered the step's outputs: the response can come first
    deadline = time.monotonic() + 10.0
    metrics = client.get("/metrics").text
    while 'model_name="tiny-gemma3",replica="two-models"} 1.0' in metrics and time.monotonic() < deadline:
        time.sleep(0.05)
        metrics = client.get("/metrics").text
    for model in ("tiny-qwen3", "tiny-gemma3"):
        assert f'elastic:num_requests_running{{model_name="{model}",replica="two-models"}} 0.0' in metrics
        assert f'elastic:kv_kind_bytes{{kind="{model}/g0",model_name="{model}",replica="two-models",state="held"}}' \
            in metrics
    assert 'elastic:generation_tokens_total{model_name="tiny-gemma3",replica="two-models"}' in metrics
    assert 'elastic:pool_chunks{client="weights",model_name="tiny-qwen3+tiny-gemma3"' in metrics
    [rank] = client.get("/v1/memory").json()["ranks"]
    assert sorted(rank["kv_kinds"]) == ["tiny-gemma3/g0", "tiny-gemma3/g1", "tiny-qwen3/g0", "tiny-qwen3/g1"]
    assert set(rank["models"]) == {"tiny-qwen3", "tiny-gemma3"}
    assert set(rank["chunks_per_client"]) == {"weights", "activations", "kv"}  # one pool for both


def test_models_list_args_are_checked():
    assert AppArgs(models=["smollm2-135m", "gemma3-270m"]).to_engine_configs(device="cpu")[1].kv_layout == "paged"
    assert [c.model for c in AppArgs(model="gemma3-270m").to_engine_configs(device="cpu")] == ["gemma3-270m"]
    for bad in ({"models": ["smollm2-135m"]}, {"models": ["a", "a"]},
                {"models": ["a", "b"], "model": "a"}, {"models": ["a", "b"], "served_model_name": "x"},
                {"models": ["a", "b"], "tensor_parallel_size": 2}):
        with pytest.raises(ValidationError):
            AppArgs(**bad)

"""engine.api.EngineClient is what deployments/ calls on an engine: AsyncEngine and the test fake both satisfy
it, member by member and signature by signature, and the fake has every public member AsyncEngine has."""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap

import pytest

from engine.api import EngineClient, GenerateRequest, RequestOutput
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.model_view import ModelView
from engine.sampling_params import SamplingParams
from tests.deployments.fake_engine import FakeEngine


def _kind(function) -> str:
    """How a caller uses it: awaited, iterated with `async for`, or called."""
    function = inspect.unwrap(function)
    if inspect.iscoroutinefunction(function):
        return "await"
    if inspect.isasyncgenfunction(function):
        return "async for"
    annotation = inspect.signature(function).return_annotation
    return "async for" if str(annotation).startswith("AsyncIterator") else "call"


def _shape(function, owner: type | None = None) -> tuple:
    """Kind, parameters (name, kind, default, annotation) and return annotation (the owner's name as Self)."""
    signature = inspect.signature(function)
    parameters = tuple((p.name, p.kind, p.default, str(p.annotation)) for p in signature.parameters.values())
    returns = str(signature.return_annotation)
    return _kind(function), parameters, "Self" if owner is not None and returns == owner.__name__ else returns


def _instance_attributes(cls) -> set[str]:
    """Attributes `__init__` (or `__post_init__`) assigns on self, and dataclass fields."""
    names = set(getattr(cls, "__dataclass_fields__", {}))
    for method_name in ("__init__", "__post_init__"):
        method = cls.__dict__.get(method_name)
        if method is None or method.__code__.co_filename.startswith("<"):  # absent, or made by @dataclass
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
    return names


def _protocol_members() -> tuple[set[str], set[str]]:
    methods = {name for name, value in vars(EngineClient).items()
               if not name.startswith("_") and callable(value)}
    data = set(EngineClient.__annotations__)
    return methods, data


def _public_members(cls) -> set[str]:
    members = {name for name in dir(cls) if not name.startswith("_")}
    return members | {name for name in _instance_attributes(cls) if not name.startswith("_")}


def test_the_protocol_names_what_deployments_calls():
    methods, data = _protocol_members()
    assert methods == {"start", "shutdown", "check_health", "generate", "abort", "stats", "memory_telemetry",
                       "run_in_engine", "stream_attached", "end_stream", "for_model"}
    assert data == {"model_name", "model_names", "max_model_len", "tokenizer", "model_config", "supports_migration"}


@pytest.mark.parametrize("cls", [AsyncEngine, FakeEngine, ModelView])
def test_engine_satisfies_the_protocol_with_the_same_signatures(cls):
    methods, data = _protocol_members()
    for name in sorted(methods):
        assert _shape(getattr(cls, name)) == _shape(getattr(EngineClient, name)), f"{cls.__name__}.{name}"
    assert data <= _public_members(cls), data - _public_members(cls)


def test_supports_migration_is_declared_not_detected():
    assert AsyncEngine.supports_migration is True
    assert FakeEngine.supports_migration is False
    assert ModelView.supports_migration is False  # one model of several in one pool (an EngineGroup)


def test_the_fake_has_every_public_member_of_async_engine_with_its_signature():
    fake_only = {"output_ids", "num_live", "kv_chunks_used", "adopt",  # the fake's knobs and assertions
                 "token_delay_s", "kv_total_chunks", "tokens_per_chunk", "num_ranks", "max_num_seqs",
                 "max_num_waiting", "submitted", "finished", "aborted", "is_dead", "is_started", "rank_placements",
                 "die", "death"}
    # the wrapped LLMEngine and its EngineConfig, and KunServe's pair driving (which needs the LLMEngine):
    # a fake has none of them (LLMServer forms pairs only with an engine that has `cooperate`)
    real_only = {"engine", "config", "cooperate", "driver"}
    real, fake = _public_members(AsyncEngine), _public_members(FakeEngine)
    assert real - real_only <= fake, sorted(real - real_only - fake)
    assert fake - real == fake_only, sorted(fake - real)
    for name in sorted(real - real_only):
        member = inspect.getattr_static(AsyncEngine, name, None)
        if callable(member) or isinstance(member, classmethod):
            fake_shape = _shape(getattr(FakeEngine, name), FakeEngine)
            assert fake_shape == _shape(getattr(AsyncEngine, name), AsyncEngine), name
        elif isinstance(member, property):
            assert isinstance(inspect.getattr_static(FakeEngine, name), property), name


def _request(request_id: str, max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(request_id, (10, 20), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_fake_run_in_engine_stream_attached_and_end_stream():
    async def run():
        engine = FakeEngine(token_delay_s=0.001)
        await engine.start()
        assert engine.is_running
        assert await engine.run_in_engine(lambda fake, a, b: (fake is engine, a + b), 2, 3) == (True, 5)

        # stream_attached: the request comes in through attach, with two tokens already generated elsewhere
        request = _request("moved", max_tokens=4)
        outputs = [output async for output in engine.stream_attached(
            "moved", lambda fake, req: fake.adopt(req, num_output_tokens=2), request)]
        expected = engine.output_ids(request.prompt_token_ids, 4)
        assert [output.new_token_ids for output in outputs] == [(expected[2],), (expected[3],)]
        assert [output.num_output_tokens for output in outputs] == [3, 4]
        assert outputs[-1].finish_reason == "length"

        # end_stream: the stream yields that output instead of its next token and ends
        stream = engine.generate(_request("local", max_tokens=8))
        first = await anext(stream)
        engine.end_stream("local", RequestOutput("local", (), "", finish_reason="migrated"))
        rest = [output async for output in stream]
        assert first.num_output_tokens == 1
        assert [output.finish_reason for output in rest] == ["migrated"]
        assert engine.finished == {"moved": "length", "local": "migrated"}

        engine.stop_thread()
        assert not engine.is_running

    asyncio.run(run())


def test_fake_from_config_and_max_tokens_that_fit():
    engine = FakeEngine.from_config(EngineConfig(max_model_len=100, max_num_seqs=3, max_num_waiting=5,
                                                 tensor_parallel_size=2))
    assert (engine.max_model_len, engine.max_num_seqs, engine.max_num_waiting, engine.num_ranks) == (100, 3, 5, 2)
    assert engine.max_tokens_that_fit(30) == 70  # the context limits it
    small = FakeEngine(kv_total_chunks=2, tokens_per_chunk=16)
    assert small.max_tokens_that_fit(30) == 2  # the KV memory limits it (32 tokens)
    assert len(small.memory_telemetry()) == 1

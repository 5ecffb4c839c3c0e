"""SamplingParams validation: every bad value is an InvalidRequestError naming its field."""

from __future__ import annotations

import math

import pytest

from engine.api import InvalidRequestError
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", "hot"), ("temperature", True),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1),
    ("top_k", -2), ("top_k", 1.5), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.5),
    ("seed", 1.5), ("seed", 2**64), ("seed", "7"),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", 3), ("frequency_penalty", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("max_tokens", 0), ("max_tokens", 1.0), ("max_tokens", None),
    ("min_tokens", -1),
    ("stop", ("",)), ("stop", (1,)), ("stop", 5),
    ("stop_token_ids", (-1,)), ("stop_token_ids", ("a",)), ("stop_token_ids", 3),
    ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("n", 0), ("n", 1.0),
    ("skip_special_tokens", 1),
])
def test_bad_value_names_its_field(field, value):
    with pytest.raises(InvalidRequestError) as raised:
        SamplingParams(**{field: value})
    assert raised.value.param == field
    assert field in raised.value.message


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(InvalidRequestError) as raised:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert raised.value.param == "min_tokens"
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


def test_accepted_edges_and_normalisation():
    params = SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=1, seed=-(2**63), presence_penalty=-2,
                            frequency_penalty=2, logprobs=20, stop="###", stop_token_ids=[7, 8])
    assert params.stop == ("###",) and params.stop_token_ids == (7, 8)
    assert isinstance(params.temperature, float) and params.is_greedy
    assert not params.has_top_k and SamplingParams(top_k=0).has_top_k is False and SamplingParams(top_k=3).has_top_k
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    hash(params)


def test_greedy_and_penalty_flags():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
    assert not SamplingParams().has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=0.5).has_penalties


def test_to_dict_round_trips():
    params = SamplingParams(temperature=0.5, stop=("x",), stop_token_ids=(3,), seed=11, logprobs=2)
    assert SamplingParams(**params.to_dict()) == params

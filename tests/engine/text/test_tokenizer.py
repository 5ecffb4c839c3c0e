"""Tokenizer loading (with the GGUF tokenizer cache) and prompt / chat encoding."""

from __future__ import annotations

import json
import time

import pytest

from engine.api import InvalidRequestError
from engine.text.tokenizer import _gguf_cache_key, encode_chat, encode_prompt, load_tokenizer

SAMPLES = ["Hello world", "  leading spaces\tand tabs\n", "你好 🎉 naïve", "<|im_start|>user\nhi<|im_end|>", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? 🎉"}]


def test_embedded_tokenizer(smollm2_tokenizer):
    assert smollm2_tokenizer.is_fast
    assert (smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id) == (1, 2)
    assert len(smollm2_tokenizer) == 49152


def test_gguf_tokenizer_cache_is_used_and_equivalent(tmp_path, smollm2_source, smollm2_tokenizer):
    entry = tmp_path / "tokenizers" / _gguf_cache_key(smollm2_source.path)
    smollm2_tokenizer.save_pretrained(entry)
    # Mark the entry so the test can tell it was read from the cache, not converted from GGUF again.
    config_path = entry / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_max_length": 4321}))
    start = time.perf_counter()
    cached = load_tokenizer(smollm2_source, cache_dir=tmp_path)
    print(f"tokenizer from cache: {time.perf_counter() - start:.2f} s")
    assert cached.model_max_length == 4321
    for text in SAMPLES:
        assert cached.encode(text) == smollm2_tokenizer.encode(text)
    assert encode_chat(cached, MESSAGES) == encode_chat(smollm2_tokenizer, MESSAGES)


def test_damaged_cache_entry_is_rebuilt_from_the_gguf(tmp_path, smollm2_source, smollm2_tokenizer):
    """Also the fidelity check of the cache: a fresh GGUF conversion (~9 s) encodes like the session's
    tokenizer, which normally comes from the cache."""
    entry = tmp_path / "tokenizers" / _gguf_cache_key(smollm2_source.path)
    entry.mkdir(parents=True)
    (entry / "tokenizer.json").write_text("not json")
    tokenizer = load_tokenizer(smollm2_source, cache_dir=tmp_path)
    assert tokenizer.encode("Hello world") == [19556, 905]
    for text in SAMPLES:
        assert tokenizer.encode(text) == smollm2_tokenizer.encode(text)
    assert encode_chat(tokenizer, MESSAGES) == encode_chat(smollm2_tokenizer, MESSAGES)
    assert json.loads((entry / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_checkpoint_directory_tokenizer(tiny_qwen3_dir, smollm2_tokenizer):
    tokenizer = load_tokenizer(str(tiny_qwen3_dir))
    assert tokenizer.is_fast and tokenizer.encode("Hello 你好") == smollm2_tokenizer.encode("Hello 你好")


def test_encode_prompt(smollm2_tokenizer):
    assert encode_prompt(smollm2_tokenizer, "Hello world") == [19556, 905]
    with pytest.raises(InvalidRequestError) as raised:
        encode_prompt(smollm2_tokenizer, ["Hello"])
    assert raised.value.param == "prompt"


def test_encode_chat_matches_transformers(smollm2_tokenizer):
    ids = encode_chat(smollm2_tokenizer, MESSAGES)
    expected = smollm2_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
    assert ids == list(expected)
    assert smollm2_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "no role"}], ["text"]])
def test_encode_chat_rejects_malformed_messages(smollm2_tokenizer, messages):
    with pytest.raises(InvalidRequestError) as raised:
        encode_chat(smollm2_tokenizer, messages)
    assert raised.value.param == "messages"

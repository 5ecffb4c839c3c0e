"""Tokenizer loading and prompt encoding (transformers' fast tokenizers).

Loading a tokenizer from GGUF through transformers takes ~10 s on this CPU (its GGUF reader builds
a numpy view per vocabulary entry), against ~0.3 s for the same tokenizer saved as tokenizer.json.
So the first load of a GGUF tokenizer is saved under ~/.cache/elastic-serve/tokenizers, keyed by
the file's path, size and mtime and the transformers version, and later starts read that copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.api import InvalidRequestError
from engine.weights import CACHE_ENV, ModelSource, default_cache_dir, resolve_model_source

__all__ = ["CACHE_ENV", "default_cache_dir", "load_tokenizer", "numbered_tokenizer"]


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers-{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def _load_gguf_tokenizer(source: ModelSource, cache_dir: Path | None) -> PreTrainedTokenizerBase:
    if cache_dir is None:
        return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file, use_fast=True)
    cached = cache_dir / "tokenizers" / _gguf_cache_key(source.path)
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached, use_fast=True)
        except Exception:  # a damaged cache entry must never stop a server from starting
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file, use_fast=True)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Save into a sibling temp dir and rename, so concurrent starts never read half a cache entry.
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cached)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass  # read-only home: serve without the cache
    return tokenizer


def load_tokenizer(
    source: ModelSource | str | Path | None, cache_dir: Path | str | None | bool = True
) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer. `cache_dir`: True = default cache, False/None = no cache, or a path."""
    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    if cache_dir is True:
        cache_dir = default_cache_dir()
    elif cache_dir is False:
        cache_dir = None
    if source.format == "gguf":
        tokenizer = _load_gguf_tokenizer(source, Path(cache_dir) if cache_dir is not None else None)
    elif source.format == "random" and not (source.directory / "tokenizer.json").is_file():
        tokenizer = numbered_tokenizer(json.loads((source.directory / "config.json").read_text())["vocab_size"])
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{source.name}: no fast tokenizer available (incremental detokenizing needs one)")
    return tokenizer


def numbered_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """A fast word-level tokenizer whose token i is the word `<i>` (<1> is EOS, <2> BOS): the tokenizer of a
    `random:` model, and of tiny test checkpoints built where no real tokenizer is installed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<0>", eos_token="<1>", bos_token="<2>")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a completion prompt, with the special tokens the tokenizer adds (BOS for Llama)."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
    return list(tokenizer.encode(text, add_special_tokens=True))


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a chat rendered by the model's template, ending with the assistant's turn opener."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{index}] needs a string 'role'", param="messages")
    if tokenizer.chat_template is None:
        raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja errors from user content (e.g. a template's raise_exception)
        raise InvalidRequestError(f"could not apply the chat template: {error}", param="messages") from error
    # The template already wrote BOS and role markers; adding special tokens again would double BOS.
    return list(tokenizer.encode(text, add_special_tokens=False))

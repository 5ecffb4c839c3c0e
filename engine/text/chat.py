"""Talk to a model in the terminal: `python -m engine.text.chat [--model M] [--max-tokens N] [--temperature T]`.

Type a message at the `> ` prompt; the reply streams as it is generated. The conversation is kept
and rendered with the model's chat template each turn (the oldest turns are dropped when it no
longer fits the context). `/exit` or end of input (Ctrl-D) quits; Ctrl-C during a reply stops that
reply and keeps what was shown, Ctrl-C at the prompt quits.

It drives `LLMEngine.step()` directly: one request at a time needs no background thread, and
Ctrl-C is turned into a flag checked between steps, so an interrupt never lands in the middle of
the engine's bookkeeping. After each reply one line of numbers goes to stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from engine.api import GenerateRequest, InvalidRequestError
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.text.tokenizer import encode_chat

EXIT_COMMANDS = ("/exit", "/quit")


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" | "length" | "abort" (interrupted)
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    seconds: float


class ChatSession:
    """A conversation with one engine: history, prompt rendering and one streamed reply at a time."""

    def __init__(self, engine: LLMEngine, sampling: SamplingParams, system: str | None = None):
        self.engine = engine
        self.sampling = sampling
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.num_turns = 0
        self.is_interrupted = False  # set by the SIGINT handler while a reply runs

    def _prompt(self) -> list[int]:
        """The chat so far as token ids; drops the oldest exchanges until the reply has room."""
        first_turn = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        while True:
            token_ids = encode_chat(self.engine.tokenizer, self.messages)
            fits = len(token_ids) + self.sampling.max_tokens <= self.engine.max_model_len
            if fits or len(self.messages) - first_turn <= 1:
                return token_ids
            del self.messages[first_turn : first_turn + 2]  # one user message and its reply

    def reply(self, user_text: str, write: Callable[[str], None]) -> Reply:
        """Adds the user's message, streams the reply through `write`, and records it in the history.
        Raises InvalidRequestError (and forgets the message) when it cannot fit the context."""
        self.messages.append({"role": "user", "content": user_text})
        token_ids = self._prompt()
        self.num_turns += 1
        request_id = f"chat-{self.num_turns}"
        try:
            self.engine.add_request(GenerateRequest(request_id, tuple(token_ids), self.sampling))
        except InvalidRequestError:
            self.messages.pop()
            raise
        started = time.perf_counter()
        pieces: list[str] = []
        last = None
        while last is None or not last.is_finished:
            if self.is_interrupted:
                last = self.engine.abort(request_id) or last
                break
            for output in self.engine.step():
                if output.request_id != request_id:
                    continue
                last = output
                if output.text_delta:
                    pieces.append(output.text_delta)
                    write(output.text_delta)
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        return Reply(
            text=text,
            finish_reason=last.finish_reason if last is not None and last.finish_reason else "abort",
            num_prompt_tokens=len(token_ids),
            num_cached_tokens=last.num_cached_tokens if last is not None else 0,
            num_output_tokens=last.num_output_tokens if last is not None else 0,
            seconds=time.perf_counter() - started,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.text.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per reply at most")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling RNG (per reply)")
    parser.add_argument("--system", default=None, help="system message (default: the template's own)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: engine's)")
    parser.add_argument("--memory-gib", type=float, default=2.0, help="device memory pool budget")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    return parser.parse_args(argv)


def build_engine(args: argparse.Namespace) -> LLMEngine:
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        device_memory_bytes=int(args.memory_gib * (1 << 30)),
        host_buffer_bytes=0,  # one conversation never needs to swap
        max_model_len=args.max_model_len,
        max_num_seqs=1,
        num_threads=args.threads,
    )
    return LLMEngine(config)


def run(session: ChatSession, read: Callable[[str], str], out: TextIO, err: TextIO) -> int:
    """The read-reply loop; `read(prompt)` is `input` (raises EOFError at end of input)."""

    def on_interrupt(signum, frame) -> None:
        session.is_interrupted = True

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return 0
        session.is_interrupted = False
        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            reply = session.reply(text, write)
        except InvalidRequestError as error:
            err.write(f"[error: {error.message}]\n")
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
        write("\n" if reply.finish_reason != "abort" else "\n[interrupted]\n")
        rate = reply.num_output_tokens / reply.seconds if reply.seconds > 0 else 0.0
        err.write(f"[{reply.num_prompt_tokens} prompt tokens ({reply.num_cached_tokens} cached), "
                  f"{reply.num_output_tokens} generated in {reply.seconds:.2f} s ({rate:.1f} tok/s), "
                  f"finish: {reply.finish_reason}]\n")
        err.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                  max_tokens=args.max_tokens)
    except InvalidRequestError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    engine = build_engine(args)
    try:
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass
        dtype = str(engine.dtype).removeprefix("torch.")
        print(f"{engine.model_name} ({dtype}, {engine.config.device}, context {engine.max_model_len}). "
              "/exit or Ctrl-D quits; Ctrl-C stops a reply.", file=sys.stderr, flush=True)
        return run(ChatSession(engine, sampling, args.system), input, sys.stdout, sys.stderr)
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())

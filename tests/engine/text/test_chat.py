"""`python -m engine.text.chat` driven through a subprocess: streamed replies, history, /exit, EOF, Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.text.tokenizer import encode_chat

REPO = Path(__file__).resolve().parents[3]
COMMON_ARGS = ["--temperature", "0", "--dtype", "float32", "--max-model-len", "512", "--threads", "1"]
STATS = re.compile(r"\[(\d+) prompt tokens \((\d+) cached\), (\d+) generated in [\d.]+ s \([\d.]+ tok/s\), "
                   r"finish: (\w+)\]")


def chat_command(max_tokens: int) -> list[str]:
    return [sys.executable, "-m", "engine.text.chat", "--max-tokens", str(max_tokens), *COMMON_ARGS]


@pytest.mark.slow  # 9 s; the chat CLI stays in the default suite (Ctrl-C)
def test_two_turns_stream_replies_keep_history_and_exit_at_eof(smollm2_tokenizer):
    first, second = "Hi", "What is 2+2?"
    done = subprocess.run(chat_command(8), input=f"{first}\n\n{second}\n", capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # stdout: a prompt, the streamed reply, a prompt (the blank line is skipped), a reply, the last prompt
    match = re.fullmatch(r"> (.+)\n> > (.+)\n> \n", done.stdout)
    assert match, repr(done.stdout)
    reply1, reply2 = match.groups()
    assert reply1 == "Hello! How can I assist you today"  # SmolLM2's greedy first 8 tokens
    assert reply2.strip()
    stats = [tuple(int(v) if v.isdigit() else v for v in m) for m in STATS.findall(done.stderr)]
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": reply1},
               {"role": "user", "content": second}]
    assert len(stats) == 2
    assert stats[0][0] == len(encode_chat(smollm2_tokenizer, history[:1]))
    assert stats[1][0] == len(encode_chat(smollm2_tokenizer, history))  # the first exchange is in the prompt
    assert stats[0][2:] == (8, "length")
    assert 1 <= stats[1][2] <= 8


@pytest.mark.slow  # CI time (10 s): the chat CLI keeps its other default-suite tests
def test_ctrl_c_stops_a_reply_and_the_chat_goes_on():
    process = subprocess.Popen(chat_command(200), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, bufsize=0)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(iter(lambda: process.stdout.read(1), "")), daemon=True)
    reader.start()

    def wait_for(predicate, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate("".join(stdout)):
            assert time.monotonic() < deadline and process.poll() is None, "".join(stdout)
            time.sleep(0.02)

    try:
        process.stdin.write("Write a long story about a dragon who learns to fly.\n")
        process.stdin.flush()
        wait_for(lambda text: len(text) > len("> ") + 20)  # the reply is streaming
        process.send_signal(signal.SIGINT)
        wait_for(lambda text: "[interrupted]\n> " in text)
        process.stdin.write("/exit\n")
        process.stdin.flush()
        stderr = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    assert process.returncode == 0, stderr[-2000:]
    stats = STATS.findall(stderr)
    assert len(stats) == 1
    num_generated, finish_reason = int(stats[0][2]), stats[0][3]
    assert finish_reason == "abort" and 0 < num_generated < 200
    assert "Traceback" not in stderr

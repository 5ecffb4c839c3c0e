"""loadtest.bench.layerkv_serve: the generated Serve configs, the telemetry it reads back and its table (fast);
the whole served burst on a tiny workload, `none` then `layerwise`, through Serve and Locust (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deployments.args import AppArgs
from loadtest.bench.layerkv_serve import format_table, kv_samples, parse_args, serve_config
from loadtest.metrics import RequestRecord, Slo, summarize

REPO = Path(__file__).resolve().parents[3]
MIB = 1 << 20


def test_defaults_are_the_offline_burst_of_the_issue_and_later_arguments_win():
    options, args = parse_args([])
    assert (args.num_prompts, args.prompt_len, args.output_len, args.kv_requests) == (8, 256, 768, 2)
    assert (args.dtype, args.threads, args.ttft_slo_ms, args.tpot_slo_ms) == ("float32", 2, 10000, 500)
    assert args.systems == "none,layerwise" and options.duration == 1200
    options, args = parse_args(["--num-prompts", "3", "--duration", "60", "--systems", "layerwise:copy"])
    assert args.num_prompts == 3 and options.duration == 60 and args.systems == "layerwise:copy"


@pytest.mark.parametrize("system, offload, staging", [("none", "none", "auto"), ("layerwise", "layerwise", "auto"),
                                                      ("layerwise:copy", "layerwise", "copy")])
def test_each_system_is_the_shipped_config_with_the_burst_s_engine(system, offload, staging):
    _, args = parse_args([])
    template = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config = serve_config(template, args, system, 700 * MIB, 18123)
    assert config["http_options"]["port"] == 18123 and len(config["applications"]) == 1
    app = config["applications"][0]
    assert app["deployments"][0]["num_replicas"] == 1
    assert app["deployments"][0]["request_router_config"] == template["applications"][0]["deployments"][0][
        "request_router_config"]
    engine = AppArgs.model_validate(app["args"]).to_engine_config(device="cpu")
    assert (engine.kv_offload, engine.kv_staging, engine.dtype, engine.num_threads) == (offload, staging, "float32", 2)
    assert engine.device_memory_bytes == 700 * MIB and engine.host_buffer_bytes == 2 << 30
    assert (engine.max_num_seqs, engine.max_model_len, engine.enable_prefix_caching) == (8, 256 + 768 + 16, False)
    assert (engine.ttft_slo_ms, engine.tpot_slo_ms) == (10000, 500)
    assert template["http_options"]["port"] == 8000  # the template is left as it was


def write_run(folder: Path, start: float, ttft_s: float, e2e_s: float, host_bytes: list[float]) -> None:
    folder.mkdir(parents=True)
    records = [RequestRecord(f"r{i}", "completions", start, e2e_s + i, ttft_s + i, (), 256, 768, 768, True)
               for i in range(2)]
    (folder / "requests.jsonl").write_text("".join(record.to_json() + "\n" for record in records))
    summary = summarize(records, slo=Slo(ttft_ms=1500, tpot_ms=500))
    (folder / "summary.json").write_text(summary.to_json())
    pool = {"chunk_bytes": MIB, "chunks_per_client": {"kv": 0, "weights": 500}, "num_free_chunks": 10}
    memory, metrics = [], []
    for index, host in enumerate(host_bytes):
        ranks = [dict(pool, chunks_per_client={"kv": 40 + index, "weights": 500})]
        memory.append({"time": start + index, "status": 200, "body": {"replica": "r", "ranks": ranks}})
        values = {'elastic:kv_offloaded_host_bytes{model_name="m"}': host,
                  'elastic:kv_offloaded_layers{model_name="m"}': host / MIB,
                  'elastic:num_preemptions_total{model_name="m"}': 1.0,
                  'elastic:slo_attained_total{model_name="m"}': 1.0, 'elastic:slo_finished_total{model_name="m"}': 2.0}
        metrics.append({"time": start + index + 0.01, "status": 200, "values": values})
    (folder / "memory.jsonl").write_text("".join(json.dumps(row) + "\n" for row in memory))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))


def test_telemetry_peaks_and_the_side_by_side_table(tmp_path):
    write_run(tmp_path / "none", 100.0, 4.0, 10.0, [0.0, 0.0, 0.0])
    write_run(tmp_path / "layerwise", 100.0, 1.0, 5.0, [0.0, 8 * MIB, 2 * MIB])
    none, layerwise = kv_samples(tmp_path / "none"), kv_samples(tmp_path / "layerwise")
    assert layerwise["peak_host_kv_mib"] == 8 and layerwise["peak_offloaded_layers"] == 8
    assert layerwise["peak_device_kv_mib"] == 42 and none["peak_host_kv_mib"] == 0
    assert layerwise["timeline"] == [(0.0, 40 * MIB, 0.0), (1.0, 41 * MIB, 8 * MIB), (2.0, 42 * MIB, 2 * MIB)]
    assert layerwise["preemptions"] == 1 and layerwise["engine_slo"] == (1, 2)
    results = {}
    for name, samples in (("none", none), ("layerwise", layerwise)):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        results[name] = {"summary": summary, "start_s": 30.0, "load": "1.0 1.0 1.0 -> 2.0 2.0 2.0", **samples}
    _, args = parse_args(["--num-prompts", "2"])
    lines = format_table(results, args, 600 * MIB).splitlines()
    assert lines[1] == "|  | none | layerwise | none / layerwise |"

    def row(name: str) -> list[str]:
        return [cell.strip() for cell in next(line for line in lines if line.startswith(f"| {name}")).split("|")[2:-1]]

    assert row("TTFT p50") == ["4.5 s", "1.5 s", "3.00x"]  # records at 4 and 5 s, 1 and 2 s
    assert row("TTFT p99") == ["5.0 s", "2.0 s", "2.51x"]
    assert row("makespan") == ["11.0 s", "6.0 s", "1.83x"]
    assert row("SLO attainment") == ["0/2 (0.0%)", "1/2 (50.0%)", ""]
    assert row("the engine's own count") == ["1/2", "1/2", ""]
    assert row("peak host KV") == ["0 MiB", "8 MiB", ""]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_served_burst_runs_both_systems_end_to_end(tmp_path):
    from loadtest.bench.layerkv_serve import main

    results = main(["--num-prompts", "3", "--prompt-len", "64", "--output-len", "16", "--kv-requests", "1",
                    "--duration", "300", "--start-timeout", "300", "--out", str(tmp_path), "--tokenizer", "words",
                    "--json", str(tmp_path / "results.json")])
    assert list(results) == ["none", "layerwise"]
    for name, result in results.items():
        summary = result["summary"]
        assert summary["num_requests"] == 3 and summary["num_ok"] == 3, (name, summary["errors"])
        assert summary["mean_output_tokens"] == 16 and summary["num_output_length_mismatches"] == 0
        assert summary["window_s"] < 300  # it stopped by itself
        assert result["peak_device_kv_mib"] > 0 and result["engine_slo"][1] == 3
        assert (tmp_path / name / "serve_config.yaml").exists() and (tmp_path / name / "server.log").exists()
    assert results["none"]["peak_host_kv_mib"] == 0
    assert json.loads((tmp_path / "results.json").read_text())["results"].keys() == {"none", "layerwise"}

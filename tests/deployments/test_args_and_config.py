"""AppArgs validation, deployment sizing, and serve_config.yaml as Serve will read it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import ServeDeploySchema

from deployments.app import deployment_options
from deployments.args import AppArgs, parse_bytes
from deployments.cluster.router import KVHeadroomRouter

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


@pytest.mark.parametrize("text, size", [(4096, 4096), ("4096", 4096), ("1GiB", 1 << 30), ("512MiB", 512 << 20),
                                        ("512M", 512 << 20), ("2GB", 2_000_000_000), ("1.5 GiB", 3 << 29),
                                        ("64k", 64 << 10)])
def test_sizes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["", "lots", "-1GiB", 0, "1 PiB", True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_app_args_defaults_and_errors():
    args = AppArgs(device_memory="1GiB")
    assert args.device_memory == 1 << 30 and args.tensor_parallel_size == 1 and args.host_buffer is None
    assert args.threads_per_rank() == 1
    assert AppArgs(cpus_per_rank=0.5).threads_per_rank() == 1
    assert AppArgs(cpus_per_rank=2, num_threads=3).threads_per_rank() == 3
    assert "secret" not in repr(AppArgs(api_key="secret"))
    for bad in ({"devcie": "cpu"}, {"device": "tpu"}, {"pool_policy": "magic"}, {"tensor_parallel_size": 0},
                {"device_memory": "a lot"}, {"api_key": " "}, {"telemetry_period_s": 2},
                {"default_sampling": {"temprature": 0.1}}):
        with pytest.raises(ValidationError):
            AppArgs.model_validate(bad)


def test_engine_config_from_args():
    engine_config = pytest.importorskip("engine.config")
    config = AppArgs(device="cpu", device_memory="256MiB", max_num_seqs=8, ttft_slo_ms=500,
                     dtype="float32").to_engine_config()
    assert isinstance(config, engine_config.EngineConfig)
    assert (config.device, config.device_memory_bytes, config.max_num_seqs, config.ttft_slo_ms,
            config.dtype, config.num_threads) == ("cpu", 256 << 20, 8, 500, "float32", 1)
    defaults = engine_config.EngineConfig()
    assert AppArgs(device="cpu").to_engine_config() == engine_config.EngineConfig(device="cpu", num_threads=1)
    assert defaults.max_num_waiting == AppArgs().to_engine_config(device="cpu").max_num_waiting
    layered = AppArgs(kv_offload="layerwise", priority_scale=3).to_engine_config(device="cpu")
    assert (layered.kv_offload, layered.priority_scale, layered.staging_mode) == ("layerwise", 3, "in_place")
    assert defaults.kv_offload == "none"
    with pytest.raises(ValueError):
        AppArgs(kv_offload="blockwise")
    tuned = AppArgs(engine_options={"tokens_per_page": 64}).to_engine_config(device="cpu")
    assert tuned.tokens_per_page == 64
    with pytest.raises(ValueError, match="tokens_per_pag"):
        AppArgs(engine_options={"tokens_per_pag": 64}).to_engine_config(device="cpu")


def test_stream_pacing_reaches_the_engine_config_from_the_yaml():
    engine_config = pytest.importorskip("engine.config")
    [app] = yaml.safe_load(CONFIG.read_text())["applications"]
    shipped = AppArgs.model_validate(app["args"]).to_engine_config(device="cpu")
    assert shipped.stream_chunks_per_s == engine_config.EngineConfig().stream_chunks_per_s == 10
    for value in (200, 12.5, None):  # the yaml's engine_options: {stream_chunks_per_s: N} (null: pacing off)
        args = AppArgs.model_validate(app["args"] | {"engine_options": {"stream_chunks_per_s": value}})
        assert args.to_engine_config(device="cpu").stream_chunks_per_s == value
    for bad in (0, -1, "fast", True, float("nan")):  # refused when the args are read, before any replica
        with pytest.raises(ValidationError, match="stream_chunks_per_s"):
            AppArgs.model_validate(app["args"] | {"engine_options": {"stream_chunks_per_s": bad}})
        with pytest.raises(ValueError, match="stream_chunks_per_s"):  # and by EngineConfig itself
            engine_config.EngineConfig(stream_chunks_per_s=bad)


def test_deployment_options_place_one_bundle_per_rank():
    assert deployment_options(AppArgs(device="cpu")) == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0}}
    tp = deployment_options(AppArgs(device="cpu", tensor_parallel_size=2, cpus_per_rank=0.5))
    assert tp == {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
                  "placement_group_bundles": [{"CPU": 0.5}, {"CPU": 0.5}],
                  "placement_group_strategy": "STRICT_PACK"}
    gpu = deployment_options(AppArgs(device="cuda", tensor_parallel_size=2))
    assert gpu["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1}, {"CPU": 1.0, "GPU": 1}]


def test_serve_config_yaml_is_valid_and_uses_the_router():
    config = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    [app] = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    AppArgs.model_validate(app["args"])
    [deployment] = app["deployments"]
    assert deployment["name"] == "LLMServer" and deployment["num_replicas"] == 1  # both cores to one replica
    assert app["args"]["cpus_per_rank"] == 2
    router = deployment["request_router_config"]
    # Serve accepts misspelled keys silently (the period would fall back to 10 s): check every key.
    assert set(router) <= set(RequestRouterConfig.model_fields)
    parsed = RequestRouterConfig(**router)
    assert parsed.request_routing_stats_period_s == 0.5
    assert parsed.get_request_router_class() is KVHeadroomRouter or parsed.request_router_class == (
        "deployments.cluster.router:KVHeadroomRouter")


def test_parameter_dropping_args():
    pytest.importorskip("engine.config")
    args = AppArgs(device="cpu", parameter_dropping={"enabled": True, "high_watermark": 0.8,
                                                     "restore_watermark": 0.4, "max_drop_fraction": 0.25})
    config = args.parameter_dropping.to_config()
    assert (config.enabled, config.high_watermark, config.restore_watermark, config.max_drop_fraction,
            config.drop_after_s, config.restore_after_s) == (True, 0.8, 0.4, 0.25, 1.0, 5.0)
    assert args.to_engine_config().enable_parameter_dropping is True
    assert AppArgs(device="cpu").to_engine_config().enable_parameter_dropping is False
    assert args.parameter_dropping.peer_hang_s == 3.0  # the pair's heartbeat (not the plan's: not in its config)
    for bad in ({"enabeld": True}, {"max_drop_fraction": 0.75}, {"high_watermark": 0}, {"peer_hang_s": 0.1}):
        with pytest.raises(ValidationError):
            AppArgs(parameter_dropping=bad)
    with pytest.raises(ValueError, match="restore_watermark"):
        AppArgs(parameter_dropping={"high_watermark": 0.5, "restore_watermark": 0.7}).parameter_dropping.to_config()


def test_building_the_app_imports_neither_torch_nor_the_engine():
    """`serve run` imports deployments.app and calls build_app in Serve's application-build task before any replica
    can start: with torch, transformers and the engine in that import it used ~7 s of a 2-core box's CPU
    (docs/SPEED.md, 2026-12-07 (night)). The replica imports them itself."""
    import subprocess
    import sys

    script = ("import sys, yaml\nimport deployments.app as app\n"
              f"config = yaml.safe_load(open({str(CONFIG)!r}))['applications'][0]['args']\n"
              "app.build_app(config)\n"
              "print(sorted(m for m in ('torch', 'transformers', 'engine.core.engine', 'engine.migration') "
              "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=CONFIG.parent)
    assert done.stdout.strip().splitlines()[-1] == "[]"

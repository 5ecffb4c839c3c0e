"""While two replicas run as a pipeline, the scheduler's KV manager is a PipelineKV: every question the
scheduler asks a KVCacheManager must have an answer there too, with the same parameters. (A scheduler change
that asked the manager something new once broke every pipelined step; this test names the missing method.)"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.cooperative.kv import PipelineKV
from engine.core import scheduler
from memory.kv import KVCacheManager


def scheduler_kv_members() -> set[str]:
    """Every `self.kv.<member>` the Scheduler uses, in its module and those of its mixins (preemption, forks)."""
    modules = {inspect.getfile(cls) for cls in scheduler.Scheduler.__mro__ if cls is not object}
    trees = [ast.parse(Path(module).read_text()) for module in sorted(modules)]
    return {node.attr for tree in trees for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "kv" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_the_scan_sees_the_schedulers_questions():
    members = scheduler_kv_members()
    assert {"chunks_to_grow", "num_available_chunks", "admit", "grow", "free", "fork", "swap_in", "swap_out",
            "can_fork"} <= members


def test_pipeline_kv_answers_every_question_the_scheduler_asks():
    missing = sorted(name for name in scheduler_kv_members() if not hasattr(PipelineKV, name))
    assert missing == []
    for name in scheduler_kv_members():
        ours, theirs = getattr(PipelineKV, name), getattr(KVCacheManager, name)
        if callable(theirs):
            # `offloaded` (layer-wise KV offload) never reaches a pipeline: EngineConfig refuses the pair
            wanted = [p for p in inspect.signature(theirs).parameters if p != "offloaded"]
            assert list(inspect.signature(ours).parameters) == wanted, name
        else:
            assert isinstance(ours, property) and isinstance(theirs, property), name


def test_layerwise_offload_and_parameter_dropping_are_refused_together():
    with pytest.raises(ValueError, match="parameter dropping"):
        EngineConfig(kv_offload="layerwise", host_buffer_bytes=1 << 20, enable_parameter_dropping=True)

"""loadtest.soak's verdict: a process whose RSS keeps growing after warm-up fails; warm-up growth and small
drifts do not."""

from __future__ import annotations

import os

from loadtest.soak import Growth, failures, growth_per_process, sample_rss, title_name


def test_growth_compares_the_second_quarter_with_the_last():
    # 20 samples: warm-up from 500 to 900 MB in the first quarter, then flat at 1000 for the replica; the
    # proxy leaks 10 MB a sample throughout.
    samples = []
    for index in range(20):
        replica = 500 + index * 100 if index < 5 else 1000
        samples.append({"ray::ServeReplica": float(replica), "ray::ProxyActor": 200.0 + 10 * index})
    growths = {growth.name: growth for growth in growth_per_process(samples)}
    assert growths["ray::ServeReplica"] == Growth("ray::ServeReplica", 1000.0, 1000.0)
    assert growths["ray::ProxyActor"] == Growth("ray::ProxyActor", 270.0, 370.0)
    assert failures(list(growths.values()), max_growth=0.10, min_growth_mb=50) == [growths["ray::ProxyActor"]]
    assert failures(list(growths.values()), max_growth=0.10, min_growth_mb=150) == []


def test_processes_missing_from_a_window_are_not_judged():
    samples = [{"a": 100.0, **({"b": 100.0} if index != 17 else {})} for index in range(20)]
    assert [growth.name for growth in growth_per_process(samples)] == ["a"]
    assert growth_per_process(samples[:7]) == []


def test_sample_rss_names_this_process():
    sample = sample_rss(os.getpid())
    assert len(sample) >= 1 and all(value > 0 for value in sample.values())


def test_ray_titles_name_the_actor_not_the_method_it_runs():
    assert title_name("ray::ServeReplica:elastic-serve:LLMServer.handle_request_streaming") == \
        "ray::ServeReplica:elastic-serve:LLMServer"
    assert title_name("ray::ServeReplica:elastic-serve:LLMServer") == "ray::ServeReplica:elastic-serve:LLMServer"
    assert title_name("ray::ProxyActor.receive_asgi_messages") == "ray::ProxyActor"

"""The GPU-scale simulator: the engine's real Scheduler, KVCacheManager and ElasticPool on the `sim` VMM
backend with a calibrated cost model in place of the ModelRunner, and the deployed cluster policies, on a
virtual clock. Commands: `python -m loadtest.sim --help`; the model, its sources and limits:
docs/SIMULATOR.md."""

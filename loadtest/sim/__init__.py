"""Simulation on the `sim` VMM backend: the real pool and KV manager at GPU scale, with a cost model."""

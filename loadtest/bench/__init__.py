"""Focused benchmarks: live migration under skew, KV transports side by side, KunServe parameter dropping."""

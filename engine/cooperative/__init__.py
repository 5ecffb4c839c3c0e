"""Cooperative execution (KunServe): two replicas of one model that dropped complementary layers serve
their requests as one two-stage pipeline (kv.py: the pair's KV bookkeeping; pipeline.py: the staged,
micro-batched forward; transport.py: hidden states between stages; pair.py: forming and dissolving it)."""

"""Tensor parallelism: rank 0's executor and the workers of ranks 1..N-1, and the messages between them."""

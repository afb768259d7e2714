"""X-WIN training: the streaming shard consumer, the model, the objectives and the loop."""

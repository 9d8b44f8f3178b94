"""merge stage: stream the gathered LoRA into the instruct checkpoint, shard by shard."""

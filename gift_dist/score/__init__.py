"""score stage: the instruct model's per-target-token log-probabilities, written as confidence shards."""

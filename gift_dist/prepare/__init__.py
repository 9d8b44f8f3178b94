"""prepare stage: tokenize once with the instruct chat template into the prepared-dataset contract."""

"""`gift-dist eval`: held-out task metrics and preservation of the instruct model."""

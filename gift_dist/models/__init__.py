"""Model loading, the base/instruct pair check, checkpoint headers and the tiny offline pairs."""

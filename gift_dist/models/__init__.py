"""Model loading, the base/instruct pair check, checkpoint headers, the tiny offline pairs and the per-token weight
formulas of the confidence weightings (shared by train and score)."""

"""train stage: DeepSpeed ZeRO-3 LoRA training of the base model with the confidence-weighted loss."""

"""What every stage does with the pair's models: load and check them (``pair``), compute target-token log-probs
(``logprob``) and the confidence weights made from them (``weights``), resolve LoRA targets (``lora_targets``),
batch rows for them (``batch``) and check prepared data against their tokenizer (``prepared_inputs``)."""

"""Training machinery shared by every training stage: LoRA files, sampling, optimizers, the loop."""

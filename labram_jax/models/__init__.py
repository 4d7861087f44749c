"""Flax Linen modules of LaBraM: encoder, fine-tuning and pretraining heads, VQ-NSP."""

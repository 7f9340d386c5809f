"""Checkpoints: the embedded default model, reading safetensors expert by expert, and the expert-less skeleton."""

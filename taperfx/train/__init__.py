"""Taper training: corpus → tokenizer and token streams → training loop → gate-zero checkpoint."""

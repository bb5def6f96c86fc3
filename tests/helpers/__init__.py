"""Helpers the tests share, imported as ``from helpers.NAME import ...`` (``tests/`` is on pytest's path).

``tapering``: the calibrate-then-taper step; ``hf_tiny``: tiny random ``transformers`` checkpoints with a
local tokenizer; ``fold_stacks``: small modules written the way users write them, for the fold tests.
Fixtures stay in ``conftest.py``; nothing is imported from it.
"""

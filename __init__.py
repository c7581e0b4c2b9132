"""polytask: a from-scratch Transformer research framework for multi-task learning and
multi-task instruction tuning.

The distribution installs the repository's folders under this one namespace, one floor each
(a module imports from its own floor or lower ones, never higher; tests/test_layering.py
checks it):

1. ``polytask.attention``   scaled dot-product and multi-head attention, masks, KV cache
2. ``polytask.core``        the backbone, data, decoding, training utilities, PEFT, interop
3. ``polytask.losses``      task losses, penalties, task weighting and gradient surgery
4. ``polytask.heads``       task heads, sharing plans, the multi-task model and objective
5. ``polytask.experiments`` the CLI, run configs, the training loop, ablations, benchmarks
"""
__version__ = "0.1.0"

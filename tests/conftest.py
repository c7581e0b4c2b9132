"""Shared fixtures: every test starts from a fixed seed, on a small thread budget."""
import os
import random

import numpy as np
import pytest
import torch
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

# Tiny test models run fastest on one thread (and the suite must not oversubscribe 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield

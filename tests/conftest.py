"""Shared fixtures: every test starts from a fixed seed, on a small thread budget."""
import os
import random

import numpy as np
import pytest
import torch
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield

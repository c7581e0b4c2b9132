"""Gradient-conflict diagnostics in the training loop: at each evaluation the per-task
gradients of the step's last micro-batch (the one-pass engine, whose exactness
tests/heads/test_per_task_gradients.py checks) give the pairwise cosines and the fraction of
conflicting pairs in ``metrics.jsonl``; computing them changes nothing about the run."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from polytask.experiments.config import load_config
from polytask.experiments.runs import train_run

TINY = Path(__file__).parents[2] / "experiments" / "configs" / "tiny.yaml"
SMALL = ["model.d_model=16", "model.n_heads=2", "model.n_encoder_layers=1",
         "model.n_decoder_layers=1", "model.d_ff=32", "data.eval_examples=2",
         "train.max_steps=4", "train.save_every=4", "train.batch_size=12"]


def _events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def test_conflicts_are_logged_at_each_evaluation_and_change_nothing(tmp_path):
    for every in (1, 4):
        train_run(load_config(TINY, SMALL + [f"train.eval_every={every}"]), tmp_path / str(every),
                  progress=False)
    logged = _events(tmp_path / "1", "gradients")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        k = len(r["tasks"])
        cos = torch.tensor(r["cosine"])
        assert k >= 2 and cos.shape == (k, k)
        torch.testing.assert_close(cos.diagonal(), torch.ones(k, dtype=cos.dtype), atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(cos, cos.T)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        assert r["conflict_fraction"] == sum(cos[i, j] < 0 for i, j in pairs) / len(pairs)
    # four diagnostics (and evaluations) in one run, one in the other: the same weights, bitwise
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("1", "4"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _events(tmp_path / "1", "train")] == \
        [r["loss"] for r in _events(tmp_path / "4", "train")]

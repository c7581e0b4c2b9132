"""Checkpoints: atomic writes, strict loading, and nothing unpickled from disk."""
import os
import pickle

import pytest
import torch
from torch import nn

from polytask.core.training.checkpoint import (latest_checkpoint, load_checkpoint, load_weights,
                             save_checkpoint, save_weights)
from polytask.core.training.manifest import atomic_write


class Tied(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.head = nn.Linear(width, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as the LM head is


def test_weights_round_trip_with_tied_tensors(tmp_path):
    a, b = Tied(), Tied()
    save_weights(tmp_path / "m.safetensors", a)
    load_weights(tmp_path / "m.safetensors", b)
    assert torch.equal(a.embed.weight, b.embed.weight)
    assert b.head.weight is b.embed.weight  # the tie survives loading


def test_mismatched_weights_are_listed(tmp_path):
    save_weights(tmp_path / "m.safetensors", Tied(4))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: embed.weight: file \(10, 4\) vs model \(10, 6\)"):
        load_weights(tmp_path / "m.safetensors", Tied(6))
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"missing tensors: 0.bias, 0.weight \| unexpected tensors: embed.weight"):
        load_weights(tmp_path / "m.safetensors", other)


def test_atomic_write_keeps_old_file_when_writer_dies(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # the temporary file is cleaned up


def test_checkpoint_pointer_moves_only_when_complete(tmp_path):
    m = Tied()
    save_checkpoint(tmp_path, 1, m, {"x": torch.ones(2)}, {"step": 1})
    first = latest_checkpoint(tmp_path)
    with pytest.raises(TypeError):  # an unserialisable state fails mid-save
        save_checkpoint(tmp_path, 2, m, {"x": torch.ones(2)}, {"step": object()})
    assert latest_checkpoint(tmp_path) == first
    tensors, state = load_checkpoint(first, Tied())
    assert state == {"step": 1} and torch.equal(tensors["x"], torch.ones(2))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = Tied()
    path = save_checkpoint(tmp_path, 1, m, {"x": torch.ones(1)}, {"step": 1})
    with open(path / "optim.pt", "wb") as f:  # plant a pickle that runs a command on load
        pickle.dump({"x": _Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, Tied())
    assert not (tmp_path / "PWNED").exists()

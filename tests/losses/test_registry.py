import pytest
import torch
from torch import nn

from polytask import losses


def test_builtin_names_are_registered():
    assert {"ce", "generative", "adversarial", "orthogonality", "soft_sharing"} <= set(losses.LOSSES.names())
    assert set(losses.WEIGHTINGS.names()) >= {"static", "uncertainty", "gradnorm", "dwa", "pcgrad", "famo"}


def test_get_returns_a_module_factory():
    criterion = losses.get("ce")(label_smoothing=0.1)
    assert isinstance(criterion, nn.Module)
    assert criterion.label_smoothing == 0.1


def test_unknown_loss_lists_known_names():
    with pytest.raises(ValueError, match="unknown loss 'focal'.*ce.*generative"):
        losses.get("focal")


def test_unknown_weighting_lists_known_names():
    with pytest.raises(ValueError, match="unknown weighting 'nosuch'.*dwa.*famo.*gradnorm"):
        losses.get_weighting("nosuch")


def test_registering_a_taken_name_fails(clean_registries):
    with pytest.raises(ValueError, match="'ce' is already registered"):
        @losses.register("ce")
        class Other(nn.Module):
            pass
    with pytest.raises(ValueError, match="'static' is already registered"):
        losses.register_weighting("static")(lambda names: None)


def test_user_registers_a_loss_from_a_script(clean_registries):
    # What an experiment script does: no library file is touched.
    @losses.register("l1_logits")
    class L1(nn.Module):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, logits, target):
            return self.scale * (logits - target).abs().mean()

    criterion = losses.get("l1_logits")(scale=2.0)
    value = criterion(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0]))
    assert value.item() == pytest.approx(2.0)
    assert "l1_logits" in losses.LOSSES.names()


def test_registered_names_do_not_leak_between_tests():
    assert "l1_logits" not in losses.LOSSES.names()

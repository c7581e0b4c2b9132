"""Fixtures for the losses tests: registries restored after tests that add entries."""
import pytest

from polytask import losses


@pytest.fixture
def clean_registries():
    """Snapshot both registries and restore them, so a test may register throwaway names."""
    saved = {reg: dict(reg._entries) for reg in (losses.LOSSES, losses.WEIGHTINGS)}
    yield
    for reg, entries in saved.items():
        reg._entries.clear()
        reg._entries.update(entries)

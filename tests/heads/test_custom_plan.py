"""A sharing strategy registered from an experiment script is selected by name, like the
built-in ones, and trains through the normal loop."""
from pathlib import Path

import pytest

from polytask import heads
from polytask.heads import SharingConfig, build_model
from polytask.heads.config import CUSTOM_PLANS
from heads_tiny import make_batch, three_tasks, tiny_config

ROOT = Path(__file__).parents[2]


@pytest.fixture
def shared_encoder():
    @heads.register_plan("shared_encoder")
    def plan(tasks, slots, sharing):
        everyone, each = [[t.name for t in tasks]], [[t.name] for t in tasks]
        return {s: each if s.startswith("decoder") else everyone for s in slots}
    yield plan
    CUSTOM_PLANS.pop("shared_encoder")


def test_registered_plan_is_built_by_name(shared_encoder):
    model = build_model(tiny_config(), three_tasks(), SharingConfig(strategy="shared_encoder"))
    shared, private = {id(p) for p in model.shared_parameters()}, {id(p) for p in model.task_parameters("gen")}
    assert all(id(p) in shared for p in model.module("encoder.1", 0).parameters())
    decoder_gen = model.module("decoder.0", model.plan.group_index("decoder.0", "gen"))
    assert all(id(p) in private for p in decoder_gen.parameters())
    out = model(make_batch([0, 1, 2, 0]))
    assert set(out.tasks) == {"gen", "cls", "rnk"}


def test_unknown_and_bad_plans_are_named(shared_encoder):
    with pytest.raises(ValueError, match="sharing.strategy = 'nope' is invalid: expected one of "
                                         "'none', 'hard', 'soft', 'hierarchical', 'mmoe', 'ple', "
                                         "'shared_encoder'"):
        SharingConfig(strategy="nope")
    with pytest.raises(ValueError, match="already registered"):
        heads.register_plan("shared_encoder")(lambda *a: {})

    @heads.register_plan("broken")
    def broken(tasks, slots, sharing):
        return {"embedding": [[t.name for t in tasks]]}
    try:
        with pytest.raises(ValueError, match="must give groups for exactly the slots"):
            build_model(tiny_config(), three_tasks(), SharingConfig(strategy="broken"))
    finally:
        CUSTOM_PLANS.pop("broken")


def test_registered_plan_trains_through_the_loop(shared_encoder, tmp_path):
    from polytask.experiments.config import load_config
    from polytask.experiments.runs import train_run
    cfg = load_config(ROOT / "experiments" / "configs" / "tiny.yaml", [
        "sharing.strategy=shared_encoder", "train.max_steps=2", "train.eval_every=2",
        "data.eval_examples=2", "train.batch_size=8", "model.d_model=32", "model.d_ff=64"])
    summary = train_run(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2

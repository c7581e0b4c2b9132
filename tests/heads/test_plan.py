"""SharingConfig validation and the partitions of every sharing plan."""
from __future__ import annotations

import pytest

from polytask.core.data.tasks import TaskSpec
from polytask.heads import SharingConfig, make_plan, slot_names
from heads_tiny import three_tasks, tiny_config


def test_config_is_strict_and_names_the_key_and_choices():
    with pytest.raises(ValueError, match="sharing.stratgy"):
        SharingConfig.from_dict({"stratgy": "hard"})
    with pytest.raises(ValueError, match="sharing.strategy.*'none', 'hard', 'soft', 'hierarchical'"):
        SharingConfig.from_dict({"strategy": "medium"})
    with pytest.raises(ValueError, match="sharing.grl_lambda"):
        SharingConfig(grl_lambda="sometimes")
    with pytest.raises(ValueError, match="sharing.soft_weight"):
        SharingConfig(strategy="soft", soft_weight=-1.0)
    with pytest.raises(ValueError, match="adversarial.*'none'"):
        SharingConfig(strategy="none", adversarial=True)
    with pytest.raises(ValueError, match="orthogonality_weight"):
        SharingConfig(strategy="hard", orthogonality_weight=0.1)
    ok = SharingConfig.from_dict({"strategy": "soft", "soft_weight": 1, "grl_lambda": "schedule"})
    assert ok.soft_weight == 1.0 and isinstance(ok.soft_weight, float)
    assert SharingConfig.from_dict(ok.to_dict()) == ok


def test_every_plan_partitions_the_tasks_at_every_slot():
    config, tasks = tiny_config(), three_tasks()
    names = {t.name for t in tasks}
    for strategy in ("none", "hard", "soft", "hierarchical"):
        plan = make_plan(SharingConfig(strategy=strategy), config, tasks)
        assert list(plan.slots) == slot_names(config)
        for slot, groups in plan.slots.items():
            assert set().union(*groups) == names and sum(len(g) for g in groups) == len(names)
            if strategy == "hard":
                assert groups == (frozenset(names),)
            if strategy in ("none", "soft"):  # single-task baselines: embeddings included
                assert all(len(g) == 1 for g in groups)
    assert make_plan(SharingConfig(strategy="soft"), config, tasks).coupled
    assert not make_plan(SharingConfig(strategy="none"), config, tasks).coupled


def test_hierarchical_groups_come_from_the_task_specs():
    config = tiny_config(n_encoder_layers=3, n_decoder_layers=3)
    tasks = three_tasks() + [TaskSpec("nli", kind="classification", labels=["a", "b"],
                                      group="understanding")]
    plan = make_plan(SharingConfig(strategy="hierarchical", shared_layers=1, group_layers=1),
                     config, tasks)
    everyone = frozenset(t.name for t in tasks)
    # bottom: all; middle: by TaskSpec.group_name; top: one task each
    by_group = {frozenset({"gen", "rnk"}), frozenset({"cls"}), frozenset({"nli"})}
    for stack in ("encoder", "decoder"):
        assert plan.groups(f"{stack}.0") == (everyone,)
        assert set(plan.groups(f"{stack}.1")) == by_group
        assert set(plan.groups(f"{stack}.2")) == {frozenset([t.name]) for t in tasks}
        assert plan.groups(f"{stack}.norm") == plan.groups(f"{stack}.2")
    assert plan.groups("embedding") == (everyone,)
    assert plan.groups("lm_head") == (everyone,)
    assert "encoder.1: {gen, rnk} | {cls} | {nli}" in plan.describe()


def test_hierarchical_depths_are_validated_against_the_layer_counts():
    with pytest.raises(ValueError, match=r"shared_layers \(2\).*group_layers \(1\).*n_encoder_layers \(2\)"):
        make_plan(SharingConfig(strategy="hierarchical", shared_layers=2, group_layers=1),
                  tiny_config(), three_tasks())
    with pytest.raises(ValueError, match="n_decoder_layers"):
        make_plan(SharingConfig(strategy="hierarchical", shared_layers=2, group_layers=0),
                  tiny_config(n_encoder_layers=3, n_decoder_layers=1), three_tasks())
    with pytest.raises(ValueError, match="sharing.shared_layers"):
        SharingConfig(strategy="hierarchical", shared_layers=-1)


def test_tied_lm_head_cannot_be_private_when_the_embedding_is_shared():
    with pytest.raises(ValueError, match="tie_embeddings"):
        make_plan(SharingConfig(strategy="hard", lm_head="per_task"), tiny_config(), three_tasks())
    plan = make_plan(SharingConfig(strategy="hard", lm_head="per_task"),
                     tiny_config(tie_embeddings=False), three_tasks())
    assert all(len(g) == 1 for g in plan.groups("lm_head"))


def test_bad_task_lists_are_rejected():
    with pytest.raises(ValueError, match="at least one task"):
        make_plan(SharingConfig(), tiny_config(), [])
    with pytest.raises(ValueError, match="unique"):
        make_plan(SharingConfig(), tiny_config(), [TaskSpec("a"), TaskSpec("a")])

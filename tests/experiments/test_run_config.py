"""Run configs: typed sections, dotted overrides, loud errors; every shipped config validates."""
from pathlib import Path

import pytest

from polytask.experiments.ablate import expand_grid, plan
from polytask.experiments.config import RunConfig, load_config
from polytask.experiments.config_files import apply_overrides, parse_overrides

CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "experiments" / "configs").glob("*.yaml")
                 if p.name != "pretrain.yaml")   # validated by tests/experiments/test_pretrain.py


def test_overrides_are_parsed_as_yaml_scalars_not_code():
    got = parse_overrides(["train.lr=1e-3", "sharing.strategy=soft", "train.bf16=true",
                           "model.n_kv_heads=null", "data.cap=__import__('os')"])
    assert got == {"train.lr": 1e-3, "sharing.strategy": "soft", "train.bf16": True,
                   "model.n_kv_heads": None, "data.cap": "__import__('os')"}


def test_override_sets_nested_key_without_touching_the_original():
    base = {"train": {"lr": 0.1}}
    out = apply_overrides(base, {"train.max_steps": 7, "model.d_model": 32})
    assert out == {"train": {"lr": 0.1, "max_steps": 7}, "model": {"d_model": 32}}
    assert base == {"train": {"lr": 0.1}}


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown config key train.max_step; known keys: max_steps"),
    ("model.norm=batchnorm", "model.norm = 'batchnorm' is invalid: expected one of 'layernorm', 'rmsnorm'"),
    ("sharing.strategy=shared", "sharing.strategy = 'shared' is invalid"),
    ("optimizer.lr=1", "unknown config section 'optimizer'"),
    ("train.batch_size=0", "train.batch_size = 0 must be positive"),
    ("train.lr", "must look like section.key=value"),
    ("data.sampling=random", "data.sampling = 'random' is invalid: expected one of 'proportional'"),
])
def test_bad_override_names_the_key_and_value(override, message):
    tiny = Path(__file__).parents[2] / "experiments" / "configs" / "tiny.yaml"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(tiny, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n  n_heads: [4\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_task_list_config(tmp_path):
    cfg = RunConfig.from_dict({"tasks": [{"name": "a", "kind": "classification",
                                          "labels": ["x", "y"]}]})
    assert cfg.tasks[0].labels == ["x", "y"] and cfg.tasks[0].loss_name == "ce"
    with pytest.raises(ValueError, match="declares no labels"):
        RunConfig.from_dict({"tasks": [{"name": "a", "kind": "classification"}]})


def test_grid_expansion_is_the_cartesian_product():
    combos = expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(combos) == 6 and combos[0] == {"a": 1, "b": "x"} and combos[-1] == {"a": 2, "b": "z"}


def test_a_grid_given_as_a_list_is_run_as_listed(tmp_path):
    combos = [{"sharing.strategy": "hard"},
              {"sharing.strategy": "hard", "sharing.adapters": {"per": "task", "r": 2}}]
    assert expand_grid(combos) == combos
    with pytest.raises(ValueError, match="grid as a list must hold mappings"):
        expand_grid([{"a": 1}, "b"])
    config = tmp_path / "list.yaml"
    config.write_text("tasks: tiny\ngrid:\n  - {sharing.strategy: none}\n"
                      "  - {sharing.strategy: hard, sharing.adapters: {per: task}}\nseeds: [0]\n")
    runs = plan(config)
    assert [name for name, *_ in runs] == ["strategy-none_seed-0",
                                           "strategy-hard_adapters-pertask_seed-0"]
    assert runs[1][3].sharing.adapters == {"per": "task"}
    with pytest.raises(ValueError, match="the grid is a list of combinations"):
        plan(config, ["grid.sharing.strategy=[hard]"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    runs = plan(path)  # validates every grid point and seed before anything runs
    assert runs
    from polytask.experiments.runs import resolve_tasks
    from polytask.heads.plan import make_plan
    for _, _, _, cfg in runs:
        make_plan(cfg.sharing, cfg.model, resolve_tasks(cfg))


def test_ablation_overrides_reach_grid_and_seeds():
    quick = Path(__file__).parents[2] / "experiments" / "configs" / "quick.yaml"
    runs = plan(quick, ["grid.sharing.strategy=[none, soft]", "seeds=[3, 4]", "train.max_steps=5"])
    assert [(c["sharing.strategy"], s) for _, c, s, _ in runs] == \
        [("none", 3), ("none", 4), ("soft", 3), ("soft", 4)]
    assert all(cfg.train.max_steps == 5 and cfg.train.seed == s for _, _, s, cfg in runs)

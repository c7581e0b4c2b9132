"""Fault injection on run configs (issue #23): every bad value is refused where it is declared,
in one ``ValueError`` line that names the key and the value (YAML: the file and the line), and
the CLI turns it into one ``polytask: error:`` line with exit status 2.

Each case's id starts with what the mistake did before the fix (checked against the code
before it, one case at a time):
``silent``    trained without a word, but wrongly (a flipped gradient, a schedule that ends
              above its peak, a key replaced by a later one);
``crash``     a traceback or a hang (a ``TypeError`` deep in a constructor, ``RecursionError``,
              building a billion layers);
``accepted``  a mistake accepted, then ignored (a loss option for no task) or refused later in
              a message that names neither the key nor the file (a sampler error after the
              tokenizer was trained, AdamW's ``Invalid beta parameter``);
``kept``      refused before too: kept as regression cases of the new messages.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from polytask import losses
from polytask.core.data.tasks import TaskSpec
from polytask.core.model.config import (ModelConfig, check_memory, format_bytes,
                                        parameter_estimate)
from polytask.core.model.fields import Bounds, bounds
from polytask.core.model.transformer import EncoderDecoder
from polytask.experiments.build import build_run
from polytask.experiments.cli import main
from polytask.experiments.config import RunConfig, check_device, load_config
from polytask.experiments.config_files import (MAX_DEPTH, MAX_VALUES, apply_overrides,
                                               parse_overrides)
from polytask.heads.config import SharingConfig
from polytask.heads.objective import MultiTaskObjective
from polytask.losses.registry import Registry

TINY = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny.yaml"
TASK = {"name": "a", "files": {"train": "a.jsonl"}}


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' machine is CPU-only; make it so where a GPU is present too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# --- values out of their declared range, given as overrides of tiny.yaml -------------------
OVERRIDES = [
    # train
    ("silent:grad_clip-negative", "train.grad_clip=-1.0",
     "train.grad_clip = -1.0 must be positive (or null: no clipping)"),
    ("silent:grad_clip-zero", "train.grad_clip=0", "train.grad_clip = 0.0 must be positive"),
    ("accepted:grad_clip-nan", "train.grad_clip=.nan", "train.grad_clip = nan must be finite"),
    ("silent:min_lr_ratio-above-1", "train.min_lr_ratio=1.5",
     "train.min_lr_ratio = 1.5 must be in [0, 1]"),
    ("silent:min_lr_ratio-negative", "train.min_lr_ratio=-0.1",
     "train.min_lr_ratio = -0.1 must be in [0, 1]"),
    ("accepted:lr-inf", "train.lr=.inf", "train.lr = inf must be finite and positive"),
    ("accepted:lr-nan", "train.lr=.nan", "train.lr = nan must be finite and positive"),
    ("accepted:weight_decay-negative", "train.weight_decay=-0.01",
     "train.weight_decay = -0.01 must be >= 0"),
    ("silent:warmup_steps-negative", "train.warmup_steps=-5",
     "train.warmup_steps = -5 must be >= 0"),
    ("silent:train_top_layers-negative", "train.train_top_layers=-1",
     "train.train_top_layers = -1 must be >= 0 (or null: train every layer)"),
    ("silent:early_stopping_patience-zero", "train.early_stopping_patience=0",
     "train.early_stopping_patience = 0 must be >= 1 (or null: never stop early)"),
    ("crash:betas-strings", "train.betas=[a, b]",
     "train.betas = ['a', 'b'] is invalid: expected list[float]"),
    ("crash:betas-one", "train.betas=[0.9]", "train.betas = [0.9] must hold exactly 2 numbers, "
     "each in [0, 1)"),
    ("accepted:betas-one-is-1", "train.betas=[0.9, 1.0]", "train.betas[1] = 1.0 must be in [0, 1)"),
    ("accepted:seed-negative", "train.seed=-1", "train.seed = -1 must be in [0, 4294967295]"),
    ("accepted:generation_max_tokens-beyond-positions", "train.generation_max_tokens=1000",
     "train.generation_max_tokens = 1000 exceeds model.max_length = 128 of the learned "
     "positions"),
    # model
    ("silent:norm_eps-zero", "model.norm_eps=0", "model.norm_eps = 0.0 must be positive"),
    ("silent:norm_eps-negative", "model.norm_eps=-1e-5",
     "model.norm_eps = -1e-05 must be positive"),
    ("silent:rope_base-zero", "model.rope_base=0", "model.rope_base = 0.0 must be > 1"),
    ("silent:init_std-zero", "model.init_std=0", "model.init_std = 0.0 must be positive "
     "(or null: d_model ** -0.5)"),
    ("crash:init_std-negative", "model.init_std=-0.1", "model.init_std = -0.1 must be positive"),
    ("crash:d_head-zero", "model.d_head=0", "model.d_head = 0 must be positive "
     "(or null: d_model // n_heads)"),
    ("kept:n_kv_heads-zero", "model.n_kv_heads=0", "model.n_kv_heads = 0 must be positive"),
    ("kept:dropout-nan", "model.dropout=.nan", "model.dropout = nan must be finite and in [0, 1)"),
    ("crash:relative_buckets-2", "model.relative_buckets=2",
     "model.relative_buckets = 2 must be >= 4"),
    ("crash:relative_max_distance-short", "model.relative_max_distance=8",
     "model.relative_max_distance = 8 must be > model.relative_buckets // 2 = 16"),
    ("crash:n_encoder_layers-billion", "model.n_encoder_layers=1000000000",
     "(n_encoder_layers = 1000000000, d_model = 64"),
    ("crash:d_model-huge", "model.d_model=100000000000", "d_model = 100000000000"),
    # sharing
    ("accepted:soft_weight-nan", "sharing.soft_weight=.nan",
     "sharing.soft_weight = nan must be finite and >= 0"),
    ("accepted:adversarial_weight-inf", "sharing.adversarial_weight=.inf",
     "sharing.adversarial_weight = inf must be finite and >= 0"),
    ("accepted:grl_lambda-inf", "sharing.grl_lambda=.inf",
     "sharing.grl_lambda = inf must be finite"),
    ("silent:grl_gamma-zero", "sharing.grl_gamma=0", "sharing.grl_gamma = 0.0 must be positive"),
    ("accepted:orthogonality_weight-nan", "sharing.orthogonality_weight=.nan",
     "sharing.orthogonality_weight = nan must be finite and >= 0"),
    # data
    ("accepted:temperature-zero", "data.temperature=0", "data.temperature = 0.0 must be positive"),
    ("silent:temperature-inf", "data.temperature=.inf", "data.temperature = inf must be finite"),
    ("accepted:cap-zero", "data.cap=0", "data.cap = 0 must be positive (or null: no cap)"),
    ("accepted:max_target_len-1", "data.max_target_len=1", "data.max_target_len = 1 must be >= 2"),
    ("accepted:vocab_size-below-specials", "data.vocab_size=4", "data.vocab_size = 4 must be > 5"),
    ("accepted:max_source_len-beyond-positions", "data.max_source_len=4096",
     "data.max_source_len = 4096 exceeds model.max_length = 128"),
    # device
    ("crash:device-bogus", "train.device=bogus", "train.device = 'bogus' is invalid: expected "
     "one of cpu, cuda, cuda:N (N a GPU index), mps"),
    ("accepted:device-cpu-index", "train.device=cpu:1", "train.device = 'cpu:1' is invalid"),
    ("crash:device-mps-index-without-mps", "train.device=mps:0",
     "train.device = 'mps:0' but this torch"),
    ("crash:device-cuda-without-cuda", "train.device=cuda",
     "train.device = 'cuda' but this torch"),
    ("crash:device-cuda-index-without-cuda", "train.device=cuda:1",
     "train.device = 'cuda:1' but this torch"),
    ("crash:device-mps-without-mps", "train.device=mps", "train.device = 'mps' but this torch"),
    # options of losses, weightings and PEFT methods; the losses section's keys
    ("crash:weighting-option-misspelt", "weighting={method: gradnorm, options: {alpah: 1.5}}",
     "weighting.options.alpah is not an option of weighting 'gradnorm'; accepted: alpha, lr, "
     "min_weight"),
    ("crash:weighting-option-string", "weighting={method: gradnorm, options: {alpha: high}}",
     "weighting.options.alpha = 'high' is invalid: expected float"),
    ("accepted:weighting-option-nan", "weighting={method: gradnorm, options: {alpha: .nan}}",
     "weighting.options.alpha = nan must be finite"),
    ("crash:weighting-weights-string", "weighting={method: static, options: {weights: {copy: x}}}",
     "weighting.options.weights = {'copy': 'x'} is invalid: expected dict[str, float]"),
    ("accepted:weighting-unknown-method", "weighting.method=gradnrom",
     "weighting.method = 'gradnrom' is invalid: unknown weighting; known: "),
    ("crash:loss-option-misspelt", "losses={ce: {label_smoothin: 0.1}}",
     "losses.ce.label_smoothin is not an option of loss 'ce'; accepted: weight, ignore_index, "
     "label_smoothing, reduction"),
    ("crash:loss-option-string", "losses={copy: {label_smoothing: lots}}",
     "losses.copy.label_smoothing = 'lots' is invalid: expected float"),
    ("accepted:losses-key-misspelt", "losses={cee: {label_smoothing: 0.1}}",
     "losses.cee names neither a task nor a loss of one; valid keys: the tasks copy, reverse, "
     "parity or their losses ce, generative"),
]


@pytest.mark.parametrize("override, message", [pytest.param(o, m, id=i) for i, o, m in OVERRIDES])
def test_bad_value_is_refused_naming_key_and_value(override, message, monkeypatch):
    _no_gpu(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_config(TINY, (["model.positions=relative"] if "relative" in override else [])
                    + [override])
    assert "\n" not in str(err.value)


def test_relative_cases_run_under_relative_positions(monkeypatch):
    """The two bucket cases above apply ``positions: relative`` first; the bucket rule only
    binds there (a learned-positions model ignores the buckets)."""
    _no_gpu(monkeypatch)
    load_config(TINY, ["model.relative_max_distance=8"])
    with pytest.raises(ValueError, match="relative_max_distance = 8"):
        load_config(TINY, ["model.positions=relative", "model.relative_max_distance=8"])


# --- task specs (core/data/tasks.py) --------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    pytest.param({"weight": float("nan")}, "tasks[a].weight = nan must be finite and >= 0",
                 id="accepted:weight-nan"),
    pytest.param({"weight": float("inf")}, "tasks[a].weight = inf must be finite and >= 0",
                 id="accepted:weight-inf"),
    pytest.param({"weight": -1}, "tasks[a].weight = -1.0 must be >= 0",
                 id="kept:weight-negative"),
    pytest.param({"max_examples": 0},
                 "tasks[a].max_examples = 0 must be positive (or null: no cap)",
                 id="accepted:max_examples-zero"),
    pytest.param({"kind": "classification", "labels": [True, False]},
                 "tasks[a].labels = [True, False] is invalid: expected list[str] or null",
                 id="crash:labels-yes-no-read-as-booleans"),
    pytest.param({"loss": "focal"}, "tasks[a].loss = 'focal' is invalid: unknown loss; known: "
                 "adversarial, ce", id="accepted:loss-unknown"),
])
def test_bad_task_spec_is_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_dict({"tasks": [{**TASK, **change}]})


def test_weight_written_as_yaml_nan_is_refused(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("tasks:\n  - {name: a, files: {train: a.jsonl}, weight: .nan}\n")
    with pytest.raises(ValueError, match=re.escape("tasks[a].weight = nan must be finite")):
        load_config(path)


# --- YAML: duplicate keys, alias bombs, deep nesting ---------------------------------------
# "billion laughs": 10 ** 9 values once the aliases of line 9 (i) are expanded, 100 written
BOMB = ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
                  for p, c in zip("abcdefgh", "bcdefghi"))
        + "train: {max_steps: 1}\n")


@pytest.mark.parametrize("text, message", [
    pytest.param("model: {d_model: 32}\ntrain: {max_steps: 5}\ndata: {cap: 3}\ntrain: {lr: 0.1}\n",
                 "dup.yaml:4: invalid YAML (duplicate key 'train'; first at line 2)",
                 id="silent:duplicate-section"),
    pytest.param("train:\n  lr: 0.1\n  max_steps: 5\n  lr: 0.2\n",
                 "dup.yaml:4: invalid YAML (duplicate key 'lr'; first at line 2)",
                 id="silent:duplicate-key"),
    pytest.param(BOMB, f"dup.yaml:9: invalid YAML (the document expands to more than "
                 f"{MAX_VALUES:,} values", id="crash:alias-bomb"),
    pytest.param("train:\n  peft: " + "[" * 5000 + "]" * 5000 + "\n",
                 f"dup.yaml:2: invalid YAML (nested more than {MAX_DEPTH} levels deep)",
                 id="crash:deep-nesting"),
    pytest.param("train: &t {peft: [*t]}\n", "dup.yaml:1: invalid YAML (the document expands",
                 id="accepted:recursive-alias"),
    pytest.param(b"train: {lr: 0.1}\n\xff\xfe\n", "dup.yaml: not a UTF-8 text file",
                 id="accepted:not-utf8"),
    pytest.param("train: {seed: 2024-01-01}\n",
                 "train.seed = datetime.date(2024, 1, 1) is invalid: expected int",
                 id="crash:date-value"),
])
def test_bad_yaml_names_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "dup.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_merge_keys_may_still_be_overridden():
    """``<<: *base`` then a key of its own is YAML's way to extend a mapping, not a duplicate."""
    got = parse_overrides(["train.peft={base: &b {r: 4, alpha: 8.0}, lora: {<<: *b, r: 2}}"])
    assert got["train.peft"]["lora"] == {"r": 2, "alpha": 8.0}


@pytest.mark.parametrize("override, message", [
    pytest.param("train.peft={method: lora, method: adapter}",
                 "cannot parse value (duplicate key 'method'; first at line 1)",
                 id="silent:override-duplicate-key"),
    pytest.param("train.peft=" + "[" * 3000 + "]" * 3000, f"nested more than {MAX_DEPTH} levels",
                 id="crash:override-deep-nesting"),
    pytest.param("train.peft=&a [*a, *a]", "the document expands to more than",
                 id="accepted:override-recursive-alias"),
])
def test_overrides_go_through_the_same_yaml_checks(override, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_config(TINY, [override])
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_apply_overrides_bounds_shared_data_it_did_not_parse():
    """An alias bomb built in Python (shared lists) must not make the copy run for ever."""
    bomb: list = ["x"] * 10
    for _ in range(9):
        bomb = [bomb] * 10       # 10**10 values once expanded, 100 objects in memory
    with pytest.raises(ValueError, match=f"more than {MAX_VALUES:,} values"):
        apply_overrides({"train": {"peft": {"x": bomb}}}, {})
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} levels deep"):
        apply_overrides({"train": deep}, {})


def test_an_empty_section_takes_overrides():
    path_data = {"train": None}
    assert apply_overrides(path_data, {"train.lr": 0.1}) == {"train": {"lr": 0.1}}


# --- the bounds helper and check_fields -----------------------------------------------------
@pytest.mark.parametrize("limits, rule", [
    (Bounds(gt=0), "positive"), (Bounds(ge=0), ">= 0"), (Bounds(ge=0, lt=1), "in [0, 1)"),
    (Bounds(ge=0, le=1), "in [0, 1]"), (Bounds(gt=0.5, lt=2.5), "in (0.5, 2.5)"),
    (Bounds(gt=1), "> 1"), (Bounds(le=3), "<= 3"), (Bounds(), ""),
])
def test_bounds_rule_reads_as_written(limits, rule):
    assert limits.rule() == rule


def test_bounds_ends_and_infinities():
    b = Bounds(ge=0, lt=1)
    assert b.problem(0.0) is None and b.problem(0.999) is None
    assert b.problem(1.0) == "must be in [0, 1)" and b.problem(-1e-9) == "must be in [0, 1)"
    assert b.problem(float("nan")) == "must be finite and in [0, 1)"
    assert Bounds(gt=0, allow_inf=True).problem(float("inf")) is None
    assert Bounds(gt=0, allow_inf=True).problem(float("nan")) == "must be finite and positive"
    with pytest.raises(TypeError, match="at most one of gt/ge"):
        bounds(gt=0, ge=0)


def test_model_sizes_are_positive_and_dropouts_below_one():
    for key in ("vocab_size", "d_model", "n_heads", "d_ff", "max_length"):
        with pytest.raises(ValueError, match=rf"model\.{key} = 0 must be positive"):
            ModelConfig(**{key: 0})
    for key in ("n_encoder_layers", "n_decoder_layers", "position_offset"):
        with pytest.raises(ValueError, match=rf"model\.{key} = -1 must be >= 0"):
            ModelConfig(**{key: -1})
    for key in ("dropout", "attention_dropout"):
        with pytest.raises(ValueError, match=rf"model\.{key} = 1.0 must be in \[0, 1\)"):
            ModelConfig(**{key: 1.0})


def test_valid_edges_still_load(monkeypatch):
    _no_gpu(monkeypatch)
    cfg = load_config(TINY, ["train.grad_clip=null", "train.min_lr_ratio=1", "train.betas=[0, 0.5]",
                             "train.train_top_layers=0", "train.warmup_steps=0",
                             "train.weight_decay=0", "data.max_target_len=2", "train.seed=0",
                             "losses={ce: {label_smoothing: 0.1}, copy: {reduction: sequence}}"])
    assert cfg.train.grad_clip is None and cfg.train.betas == [0.0, 0.5]
    assert isinstance(cfg.train.min_lr_ratio, float)
    options = cfg.task_loss_options(cfg.specs())
    assert options == {"copy": {"reduction": "sequence"}, "parity": {"label_smoothing": 0.1},
                       "reverse": {}}


# --- train.device ---------------------------------------------------------------------------
def test_device_forms_and_availability(monkeypatch):
    _no_gpu(monkeypatch)
    check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(ValueError, match=re.escape("train.device = 'cuda:2' but this machine has "
                                                   "2 CUDA device(s), numbered from 0")):
        check_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_device("mps")
    check_device("cpu:0")
    for bad in ("gpu", "cuda:", "cuda:-1", "CUDA", " cpu", "cpu:1", "mps:1"):
        with pytest.raises(ValueError, match="is invalid: expected one of cpu, cuda, cuda:N"):
            check_device(bad)


# --- options of registered losses and weightings, generically ------------------------------
@pytest.mark.parametrize("name", losses.WEIGHTINGS.names())
def test_every_weighting_names_a_misspelt_option_and_its_accepted_ones(name):
    """Read from each constructor's signature: methods added later are covered too."""
    with pytest.raises(ValueError, match=rf"weighting\.options\.zzz is not an option of "
                                         rf"weighting '{name}'; accepted: ") as err:
        losses.WEIGHTINGS.build(name, ["a", "b"], options={"zzz": 1}, where="weighting.options")
    assert "gradient_reducer" not in str(err.value)


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_every_loss_names_a_misspelt_option(name):
    with pytest.raises(ValueError, match=rf"losses\.x\.zzz is not an option of loss '{name}'"):
        losses.LOSSES.build(name, options={"zzz": 1}, where="losses.x")


def test_registry_check_is_generic_over_any_registered_class():
    widgets: Registry = Registry("widget", reserved=("hook",))

    @widgets.register("plain")
    class Plain:
        def __init__(self, names, size: int = 1, *, scale: float = 1.0, shape=None, hook=None):
            if shape is not None and len(shape) != 2:   # unannotated: TypeError for an int
                raise ValueError("shape must have 2 items")
            self.size, self.scale = size, scale

    @widgets.register("open")
    def make_open(names, **anything):
        return anything

    built = widgets.build("plain", ["a"], options={"size": 2, "scale": 3}, where="w", hook=print)
    assert (built.size, built.scale) == (2, 3.0) and isinstance(built.scale, float)
    assert widgets.build("open", ["a"], options={"whatever": 1}, where="w") == {"whatever": 1}
    with pytest.raises(ValueError, match="w.sise is not an option of widget 'plain'; accepted: "
                                         "size, scale, shape$"):
        widgets.build("plain", ["a"], options={"sise": 2}, where="w")
    with pytest.raises(ValueError, match=r"w.size = 2.5 is invalid: expected int"):
        widgets.build("plain", ["a"], options={"size": 2.5}, where="w")
    with pytest.raises(ValueError, match=r"w.scale = inf must be finite"):
        widgets.build("plain", ["a"], options={"scale": float("inf")}, where="w")
    with pytest.raises(ValueError, match="w.hook cannot be set in a config"):
        widgets.build("plain", ["a"], options={"hook": 1}, where="w")
    with pytest.raises(ValueError, match=r"w = \{'shape': 3\} rejected by widget 'plain': "
                                         r"object of type 'int' has no len\(\)"):
        widgets.build("plain", ["a"], options={"shape": 3}, where="w")
    with pytest.raises(ValueError, match=r"w = \{'shape': \[1\]\} rejected by widget 'plain': "
                                         "shape must have 2 items"):
        widgets.build("plain", ["a"], options={"shape": [1]}, where="w")


# --- sizes against memory, before anything is allocated -------------------------------------
SMALL = dict(vocab_size=61, d_model=32, n_heads=4, d_ff=48, n_encoder_layers=2,
             n_decoder_layers=1, max_length=40)


@pytest.mark.parametrize("change", [
    {}, {"positions": "relative", "norm": "rmsnorm", "bias": False, "relative_buckets": 8,
         "relative_max_distance": 16},
    {"activation": "swiglu", "tie_embeddings": False, "lm_head_bias": True},
    {"n_kv_heads": 2, "d_head": 16, "positions": "rope", "embedding_norm": True},
    {"positions": "learned", "position_offset": 2, "norm_position": "post",
     "n_encoder_layers": 0},
])
def test_parameter_estimate_is_within_two_percent_of_the_built_model(change):
    config = ModelConfig(**{**SMALL, **change})
    real = sum(p.numel() for p in EncoderDecoder(config).parameters())
    estimate = sum(parameter_estimate(config).values())
    assert abs(estimate - real) <= 0.02 * real, (estimate, real)


def test_memory_check_compares_with_the_given_memory():
    config = ModelConfig(**SMALL)
    need = check_memory(config, memory=10**12)
    assert need == 4 * sum(parameter_estimate(config).values())
    assert check_memory(config, memory=need) == need
    with pytest.raises(ValueError, match=re.escape(
            f"model: about {format_bytes(2 * need)} of float64 parameters, mostly")):
        check_memory(config, dtype="float64", memory=need)
    with pytest.raises(ValueError, match=r"x 3 backbones \(one per task\)"):
        check_memory(config, copies=3, memory=2 * need)
    big = ModelConfig(**{**SMALL, "vocab_size": 10**11})
    with pytest.raises(ValueError, match=r"mostly embeddings \(vocab_size = 100000000000, "
                                         r"d_model = 32\), exceeds this machine's 1 GB"):
        check_memory(big, memory=10**9)
    assert format_bytes(4.1e12) == "4.1 TB" and format_bytes(512) == "512 bytes"


def test_building_a_run_checks_memory_before_the_model(tmp_path):
    """The one call in ``experiments.build.build_run`` refuses a config that skipped the
    config-time check (built in Python), before any layer is allocated."""
    cfg = load_config(TINY)
    huge = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_decoder_layers=10**9))
    with pytest.raises(ValueError, match=r"mostly decoder layers \(n_decoder_layers = 1000000000"):
        build_run(huge, huge.specs(), tmp_path, fresh_tokenizer=True)


def test_objective_checks_the_options_of_each_task_loss():
    specs = [TaskSpec(name="a"), TaskSpec(name="b", kind="classification", labels=["x", "y"])]
    with pytest.raises(ValueError, match="losses.b.label_smoothin is not an option of loss 'ce'"):
        MultiTaskObjective(specs, SharingConfig(), {"b": {"label_smoothin": 0.1}})
    with pytest.raises(ValueError, match="losses.a = {'reduction': 'mean'} rejected by loss "
                                         "'generative': reduction 'mean' must be one of"):
        MultiTaskObjective(specs, SharingConfig(), {"a": {"reduction": "mean"}})


# --- the command line: exit 2 and one line naming the key -----------------------------------
@pytest.mark.parametrize("override, key", [
    pytest.param("train.grad_clip=-1.0", "train.grad_clip = -1.0", id="grad_clip"),
    pytest.param("train.lr=.inf", "train.lr = inf", id="lr-inf"),
    pytest.param("train.betas=[a, b]", "train.betas = ['a', 'b']", id="betas-strings"),
    pytest.param("train.betas=[0.9]", "train.betas = [0.9]", id="betas-one"),
    pytest.param("train.device=bogus", "train.device = 'bogus'", id="device-bogus"),
    pytest.param("train.device=cuda", "train.device = 'cuda' but", id="device-cuda"),
    pytest.param("model.norm_eps=0", "model.norm_eps = 0.0", id="norm_eps"),
    pytest.param("model.n_encoder_layers=1000000000", "n_encoder_layers = 1000000000",
                 id="billion-layers"),
    pytest.param("sharing.soft_weight=.nan", "sharing.soft_weight = nan", id="soft_weight-nan"),
    pytest.param("weighting={method: gradnorm, options: {alpah: 1.5}}", "weighting.options.alpah",
                 id="weighting-option"),
    pytest.param("losses={ce: {label_smoothin: 0.1}}", "losses.ce.label_smoothin",
                 id="loss-option"),
    pytest.param("losses={cee: {label_smoothing: 0.1}}", "losses.cee", id="losses-key"),
    pytest.param("data.temperature=0", "data.temperature = 0.0", id="temperature"),
])
def test_cli_reports_one_line_naming_the_key(override, key, tmp_path, capsys, monkeypatch):
    _no_gpu(monkeypatch)
    assert main(["train", str(TINY), override, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("polytask: error: ") and key in err[0], err
    assert not (tmp_path / "run").exists()   # refused before anything was written


@pytest.mark.parametrize("text, where", [
    pytest.param("train: {max_steps: 1}\ntrain: {lr: 0.1}\n", "bad.yaml:2: invalid YAML "
                 "(duplicate key 'train'; first at line 1)", id="duplicate"),
    pytest.param(BOMB, "bad.yaml:9: invalid YAML (the document expands", id="alias-bomb"),
    pytest.param("train: " + "[" * 2000 + "]" * 2000, "bad.yaml:1: invalid YAML (nested more",
                 id="deep"),
])
def test_cli_reports_bad_yaml_in_one_line(text, where, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("polytask: error: ") and where in err[0], err


def _weighting_of(cfg_data, tmp_path):
    """The weighting ``build_parts`` makes for a tiny run config given as a dict."""
    from polytask.experiments.build import build_parts, resolve_tasks
    cfg = RunConfig.from_dict(cfg_data)
    specs = resolve_tasks(cfg)
    data, _, model = build_run(cfg, specs, tmp_path, fresh_tokenizer=True, rank=0)
    return build_parts(cfg, specs, data, model, rank=0, world=1, announce=False).weighting


def test_task_weight_is_the_static_weight_and_refused_elsewhere(tmp_path):
    """A task spec's ``weight`` used to be read by nothing: it is the static weighting's weight
    for that task (``weighting.options.weights`` wins), and an error with any other method."""
    from polytask.experiments.suite import load_suite
    specs = [dataclasses.asdict(s) for s in load_suite("tiny")]
    specs[0]["weight"], specs[1]["weight"] = 2.5, 0.5
    base = {"model": {"d_model": 16, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1,
                      "d_ff": 32}, "tasks": specs, "data": {"eval_examples": 4, "vocab_size": 60}}
    weighting = _weighting_of({**base, "weighting": {"method": "static", "options": {
        "weights": {specs[1]["name"]: 3.0}}}}, tmp_path / "a")
    assert weighting.weights[specs[0]["name"]] == 2.5 and weighting.weights[specs[1]["name"]] == 3.0
    assert weighting.weights[specs[2]["name"]] == 1.0
    with pytest.raises(ValueError, match=rf"tasks\[{specs[0]['name']}\]\.weight = 2\.5 applies "
                                         r"with weighting\.method: static only; 'pcgrad'"):
        _weighting_of({**base, "weighting": {"method": "pcgrad"}}, tmp_path / "b")


@pytest.mark.parametrize("strategy", ["none", "soft"])
def test_a_gradient_weighting_without_shared_parameters_is_refused_at_load(strategy):
    """``pcgrad`` with a plan that shares nothing used to fail inside the run (``per-task
    gradients need at least one shared parameter``), partway through an ablation grid."""
    tiny = Path(__file__).parents[1] / "experiments" / "configs" / "tiny.yaml"
    from polytask.experiments.config import load_config
    with pytest.raises(ValueError, match=rf"weighting.method = 'pcgrad' combines .* "
                                         rf"sharing.strategy = '{strategy}' shares none"):
        load_config(tiny, ["weighting.method=pcgrad", f"sharing.strategy={strategy}"])
    load_config(tiny, ["weighting.method=uncertainty", f"sharing.strategy={strategy}"])

"""Run configuration: one YAML file, every section a typed dataclass, dotted overrides.

```yaml
model:     {d_model: 128, n_heads: 4, ...}     # polytask.core.model.config.ModelConfig
tasks:     tiny                                # a built-in suite name, or a list of task specs
sharing:   {strategy: hard}                    # heads.SharingConfig
weighting: {method: static}                    # losses.get_weighting(method)(**options)
losses:    {ce: {label_smoothing: 0.1}}        # options per loss name
data:      {sampling: proportional}            # DataConfig
train:     {max_steps: 200, batch_size: 16}    # TrainConfig
init:      path/to/hf-t5-dir                   # optional: start from a pretrained checkpoint
```

``init:`` names a local Hugging Face T5/BART directory or a polytask run directory. The model
section then comes from the checkpoint: a ``model:`` key may only repeat the checkpoint's value,
except :data:`MAY_DIFFER` (regularisation and kernels, which do not change the function the
weights compute). The run uses the checkpoint's tokenizer (``data.vocab_size`` and
``data.tokenizer`` are not used).

Overrides use dotted keys, parsed as YAML scalars (never ``eval``):
``train.max_steps=50 sharing.strategy=soft model.d_model=64``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from polytask.core.interop import hf_model_config
from polytask.core.model.config import ModelConfig, check_fields, from_dict
from polytask.core.data.tasks import TaskSpec
from polytask.heads.config import SharingConfig


@dataclass
class WeightingConfig:
    """``method`` names a registered weighting; ``options`` are passed to its constructor.

    ``gradient_reducer`` is a constructor argument too, but the training loop sets it (the
    cross-rank average under data parallelism), so a config may not.
    """

    method: str = "static"
    options: dict[str, Any] = field(default_factory=dict)

    RESERVED_OPTIONS = ("gradient_reducer",)

    def __post_init__(self) -> None:
        check_fields(self, "weighting")
        reserved = [k for k in self.options if k in self.RESERVED_OPTIONS]
        if reserved:
            raise ValueError(f"weighting.options.{reserved[0]} cannot be set in a config: the "
                             f"training loop sets it (averaging per-task gradients across ranks "
                             f"when run under torchrun)")


@dataclass
class DataConfig:
    sampling: Literal["proportional", "temperature", "uniform", "round_robin"] = "proportional"
    temperature: float = 2.0            # p ∝ n^(1/T) for sampling: temperature
    cap: int | None = None              # per-task cap on examples in the mixture rates (T5)
    max_source_len: int = 128
    max_target_len: int = 64
    truncation: Literal["truncate", "error", "drop"] = "truncate"
    vocab_size: int = 1000              # sentencepiece vocabulary trained on the run's tasks
    tokenizer: Literal["unigram", "bpe"] = "unigram"
    eval_examples: int = 200            # per task, for periodic validation (and other splits)
    test_examples: int | None = None    # per task, for the final test; None: every example
    # templates scored at the final test: "first" (the main score, cheap) or "all" (T0's
    # robustness: mean/min/max over every template in summary.json, k templates cost k x the
    # test); the main per-task score is always the first template's (experiments.evaluate)
    eval_templates: Literal["first", "all"] = "first"
    # demonstrations from the train split prepended at the final test and `polytask eval`
    # (never at validation: checkpoints are chosen zero-shot)
    eval_shots: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "data")
        for name in ("max_source_len", "max_target_len", "vocab_size", "eval_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} = {getattr(self, name)} must be positive")
        if self.eval_shots < 0:
            raise ValueError(f"data.eval_shots = {self.eval_shots} must be >= 0 (0: zero-shot)")
        if self.test_examples is not None and self.test_examples <= 0:
            raise ValueError(f"data.test_examples = {self.test_examples} must be positive "
                             "(or null: score every test example)")


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    bf16: bool = False                  # autocast the forward pass to bfloat16
    dtype: Literal["float32", "float64"] = "float32"  # parameter dtype (float64: exactness checks)
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    early_stopping_patience: int | None = None   # evaluations without improvement
    # what selects checkpoints and stops early: "average_seen" (mean over trained tasks) or a
    # trained task's name; held-out tasks never may (experiments.evaluate.check_selection_metric)
    early_stopping_metric: str = "average_seen"
    train_top_layers: int | None = None  # layerwise freezing: train only the top N layers per stack
    train_only: list[str] = field(default_factory=list)  # discriminative tuning, e.g. [decoder]
    peft: dict[str, Any] = field(default_factory=dict)   # {method: lora, r: 8, ...}
    # False (with init:): weight files hold only what is not in the base checkpoint (PEFT
    # tensors, heads, ...); loading rebuilds the base from init:, checked against base.json
    save_base: bool = True
    max_bad_steps: int = 5              # consecutive non-finite steps before the run stops
    generation_max_tokens: int = 48
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self, "train")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every",
                     "max_bad_steps", "generation_max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} = {getattr(self, name)} must be positive")
        if self.max_steps < 0:   # 0: evaluate and save the initial model (e.g. a pretrained one)
            raise ValueError(f"train.max_steps = {self.max_steps} must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"train.lr = {self.lr} must be positive")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.grad_accum ({self.grad_accum}) must divide "
                             f"train.batch_size ({self.batch_size})")


class _Loader(yaml.SafeLoader):
    """Safe YAML, plus floats written without a dot (``1e-3``), which YAML 1.1 reads as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|"""
               r"""^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$|"""
               r"""^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


SECTIONS = ("model", "tasks", "sharing", "weighting", "losses", "data", "train", "init")

#: model keys that may differ from an ``init:`` checkpoint's
MAY_DIFFER = ("dropout", "attention_dropout", "attention_backend")


def init_kind(path: str | Path) -> Literal["hf", "run"]:
    """``hf`` for a Hugging Face model directory, ``run`` for a polytask run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"init: {path} is not a directory (expected a Hugging Face T5/BART "
                         "directory or a polytask run directory)")
    if (path / "config.json").is_file():
        try:
            data = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"init: {path / 'config.json'}: not a JSON file ({err})") from None
        if isinstance(data, dict) and "model_type" in data:
            return "hf"
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            return "run"
    raise ValueError(f"init: {path} holds neither a Hugging Face config.json (with model_type) "
                     "nor a polytask run's config.json")


def init_model_config(path: str | Path, given: dict[str, Any] | None) -> ModelConfig:
    """The checkpoint's model config with the ``model:`` keys of the run config applied; a
    key that contradicts the checkpoint raises, naming both values."""
    if init_kind(path) == "hf":
        base = hf_model_config(path)
    else:
        saved = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["model"]
        base = from_dict(ModelConfig, saved, "model")
    given = dict(given or {})
    from_dict(ModelConfig, {**base.to_dict(), **given}, "model")   # unknown keys and types
    for key, value in given.items():
        ours = getattr(base, key)
        if key not in MAY_DIFFER and value != ours:
            raise ValueError(f"model.{key} = {value!r} contradicts the init checkpoint {path} "
                             f"({key} = {ours!r}); only {', '.join(MAY_DIFFER)} may differ")
    return dataclasses.replace(base, **{k: v for k, v in given.items() if k in MAY_DIFFER})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: str | list[TaskSpec] = "tiny"
    sharing: SharingConfig = field(default_factory=SharingConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, resolve_init: bool = True) -> "RunConfig":
        """``resolve_init``: read an ``init:`` checkpoint's model config (see the module doc);
        False for a run's own saved config.json, whose model section is already complete."""
        if not isinstance(data, dict):
            raise ValueError(f"a run config must be a mapping of sections, got {type(data).__name__}")
        unknown = [k for k in data if k not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown config section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
        tasks = data.get("tasks", "tiny")
        if isinstance(tasks, list):
            tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
        elif not isinstance(tasks, str):
            raise ValueError(f"tasks must be a suite name or a list of task specs, got {tasks!r}")
        losses = data.get("losses") or {}
        if not isinstance(losses, dict) or not all(isinstance(v, dict) for v in losses.values()):
            raise ValueError(f"losses must map loss names to option mappings, got {losses!r}")
        init = data.get("init")
        if init is not None and not isinstance(init, str):
            raise ValueError(f"init = {init!r} must be a directory path")
        if init is not None and resolve_init:
            model = init_model_config(init, data.get("model"))
        else:
            model = from_dict(ModelConfig, data.get("model"), "model")
        return cls(
            init=init,
            model=model,
            tasks=tasks,
            sharing=from_dict(SharingConfig, data.get("sharing"), "sharing"),
            weighting=from_dict(WeightingConfig, data.get("weighting"), "weighting"),
            losses=losses,
            data=from_dict(DataConfig, data.get("data"), "data"),
            train=from_dict(TrainConfig, data.get("train"), "train"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out))  # plain JSON types only


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "sharing.strategy=soft"]`` -> ``{"train.lr": 0.001, ...}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            out[key.strip()] = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: cannot parse value ({e.problem})") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy). Unknown keys are caught by ``from_dict``."""
    data = json.loads(json.dumps(data))
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for i, p in enumerate(parents):
            if p not in SECTIONS and i == 0:
                raise ValueError(f"unknown config section {p!r} in override {dotted!r}; "
                                 f"known: {', '.join(SECTIONS)}")
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"override {dotted!r}: {'.'.join(parents[:i + 1])} is not a section")
            node = nxt
        if not parents and leaf not in SECTIONS:
            raise ValueError(f"unknown config section {leaf!r}; known: {', '.join(SECTIONS)}")
        node[leaf] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate every section."""
    data = load_yaml(path)
    data.pop("grid", None)
    data.pop("seeds", None)
    return RunConfig.from_dict(apply_overrides(data, parse_overrides(overrides or [])))

"""Run configuration: one YAML file, every section a typed dataclass, dotted overrides.

```yaml
model:     {d_model: 128, n_heads: 4, ...}     # polytask.core.model.config.ModelConfig
tasks:     tiny                                # a built-in suite name, or a list of task specs
sharing:   {strategy: hard}                    # heads.SharingConfig
weighting: {method: static}                    # losses.WEIGHTINGS.build(method, options=...)
losses:    {ce: {label_smoothing: 0.1}}        # options per loss name or per task name
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
``train.max_steps=50 sharing.strategy=soft model.d_model=64``. Reading the file and the
overrides is :mod:`polytask.experiments.config_files`'s (:func:`load_config` joins the two).

Every value is checked where its field is declared (``bounds`` in the dataclasses below:
:mod:`polytask.core.model.fields`), every option of a loss, weighting or PEFT method against
its constructor, and the YAML itself: a key given twice in a mapping, nesting deeper than
:data:`~polytask.experiments.config_files.MAX_DEPTH` and aliases expanding past
:data:`~polytask.experiments.config_files.MAX_VALUES` values are errors naming the file and
line. A user's config is also checked against this machine: ``train.device`` and the model's
size (:meth:`RunConfig.check_parts`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from polytask.core.interop import hf_model_config
from polytask.core.data.tasks import TaskSpec
from polytask.core.data.tokenizer import SEP_ID, Tokenizer
from polytask.core.model.config import ModelConfig
from polytask.core.model.fields import bounds, check_fields, from_dict, short_repr
from polytask.experiments.config_files import SECTIONS, apply_overrides, load_yaml, parse_overrides
from polytask.experiments.continual_config import ContinualConfig, check_stages
from polytask.experiments.suite import load_suite
from polytask.heads.config import SharingConfig
from polytask.losses import LOSSES, WEIGHTINGS
from polytask.losses.weighting import GradientWeighting


@dataclass
class WeightingConfig:
    """``method`` names a registered weighting; ``options`` are passed to its constructor.

    ``gradient_reducer`` is a constructor argument too, but the training loop sets it (the
    cross-rank average under data parallelism), so a config may not.
    """

    method: str = "static"  # a registered task weighting (below)
    # keyword options of the method's constructor (below)
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
    # how a batch's tasks are drawn: by size, size^(1/T), uniformly or in turn
    sampling: Literal["proportional", "temperature", "uniform", "round_robin"] = "proportional"
    # p ∝ n^(1/T) for sampling: temperature (1: proportional, -> inf: uniform)
    temperature: float = field(default=2.0, metadata=bounds(gt=0))
    # per-task cap on examples in the mixture rates (T5)
    cap: int | None = field(default=None, metadata=bounds(gt=0, null="no cap"))
    # source tokens kept per example
    max_source_len: int = field(default=128, metadata=bounds(gt=0))
    # target tokens kept per example, counting the decoder's start token (so at least 2)
    max_target_len: int = field(default=64, metadata=bounds(ge=2))
    # a longer example: cut it, raise an error, or drop it
    truncation: Literal["truncate", "error", "drop"] = "truncate"
    # sentencepiece vocabulary trained on the run's tasks, special ids included
    vocab_size: int = field(default=1000, metadata=bounds(gt=SEP_ID + 1))
    tokenizer: Literal["unigram", "bpe"] = "unigram"  # sentencepiece model type
    # per task, for periodic validation (and other splits)
    eval_examples: int = field(default=200, metadata=bounds(gt=0))
    # per task, for the final test
    test_examples: int | None = field(default=None, metadata=bounds(
        gt=0, null="score every test example"))
    # templates scored at the final test: "first" (the main score, cheap) or "all" (T0's
    # robustness: mean/min/max over every template in summary.json, k templates cost k x the
    # test); the main per-task score is always the first template's (experiments.evaluate)
    eval_templates: Literal["first", "all"] = "first"
    # demonstrations from the train split prepended at the final test and `polytask eval`
    # (never at validation: checkpoints are chosen zero-shot); 0: zero-shot
    eval_shots: int = field(default=0, metadata=bounds(ge=0))

    def __post_init__(self) -> None:
        check_fields(self, "data")   # types and the bounds above


#: the ``train.device`` forms accepted: where a run's tensors live (``cpu:0`` and ``mps:0``,
#: torch's names of the one CPU and the one Apple GPU, too)
DEVICE_FORMS = "cpu, cuda, cuda:N (N a GPU index), mps"


def check_device(device: str, key: str = "train.device") -> None:
    """``device`` names a device this torch can use now, else one ``ValueError`` line: a
    typo lists :data:`DEVICE_FORMS`; ``cuda`` without CUDA, an index past the GPUs, or ``mps``
    off Apple silicon says so (checked when the config loads, not at the first tensor)."""
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device)
    if match is None or (match[1] != "cuda" and match[2] not in (None, "0")):
        raise ValueError(f"{key} = {device!r} is invalid: expected one of {DEVICE_FORMS}")
    kind, index = match[1], match[2]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} = {device!r} but this torch {torch.__version__} has no usable "
                         "CUDA (torch.cuda.is_available() is False: a CPU-only build or no GPU "
                         "visible); use train.device=cpu")
    if kind == "cuda" and index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(f"{key} = {device!r} but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key} = {device!r} but this torch has no usable MPS (Apple silicon) "
                         "backend (torch.backends.mps.is_available() is False); use cpu")


@dataclass
class TrainConfig:
    # optimizer steps; 0: evaluate and save the initial model (e.g. a pretrained one)
    max_steps: int = field(default=200, metadata=bounds(ge=0))
    batch_size: int = field(default=16, metadata=bounds(gt=0))  # examples per optimizer step
    # micro-batches per optimizer step
    grad_accum: int = field(default=1, metadata=bounds(gt=0))
    lr: float = field(default=3e-4, metadata=bounds(gt=0))  # peak learning rate of AdamW
    # AdamW's decoupled weight decay
    weight_decay: float = field(default=0.01, metadata=bounds(ge=0))
    # AdamW's (beta1, beta2); 1 would never forget the first gradient
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98],
                               metadata=bounds(ge=0, lt=1, length=2))
    # linear warm-up steps before the schedule
    warmup_steps: int = field(default=20, metadata=bounds(ge=0))
    # learning-rate decay after warm-up
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # the schedule decays to min_lr_ratio * lr
    min_lr_ratio: float = field(default=0.1, metadata=bounds(ge=0, le=1))
    # max gradient norm; a negative one would flip every gradient, 0 zero every update
    grad_clip: float | None = field(default=1.0, metadata=bounds(gt=0, null="no clipping"))
    bf16: bool = False                  # autocast the forward pass to bfloat16
    dtype: Literal["float32", "float64"] = "float32"  # parameter dtype (float64: exactness checks)
    # seeds torch, numpy and random (numpy's seeds are 32-bit)
    seed: int = field(default=0, metadata=bounds(ge=0, le=2**32 - 1))
    # steps between validations (and checkpoint selection)
    eval_every: int = field(default=50, metadata=bounds(gt=0))
    save_every: int = field(default=50, metadata=bounds(gt=0))  # steps between checkpoints
    # evaluations without improvement (0 would stop at the first evaluation)
    early_stopping_patience: int | None = field(default=None, metadata=bounds(
        ge=1, null="never stop early"))
    # what selects checkpoints and stops early: "average_seen" (mean over trained tasks) or a
    # trained task's name; held-out tasks never may (experiments.evaluate.check_selection_metric)
    early_stopping_metric: str = "average_seen"
    # layerwise freezing: train only the top N layers of each stack (and the heads, final norms
    # and LM head); 0 trains those alone, a linear probe of the frozen backbone
    train_top_layers: int | None = field(default=None, metadata=bounds(
        ge=0, null="train every layer"))
    train_only: list[str] = field(default_factory=list)  # discriminative tuning, e.g. [decoder]
    # parameter-efficient fine-tuning: a method and its options
    peft: dict[str, Any] = field(default_factory=dict)   # {method: lora, r: 8, ...}
    # False (with init:): weight files hold only what is not in the base checkpoint (PEFT
    # tensors, heads, ...); loading rebuilds the base from init:, checked against base.json
    save_base: bool = True
    # consecutive non-finite steps before the run stops
    max_bad_steps: int = field(default=5, metadata=bounds(gt=0))
    # new tokens generated per example at evaluation
    generation_max_tokens: int = field(default=48, metadata=bounds(gt=0))
    # where the run's tensors live
    device: str = "cpu"                 # DEVICE_FORMS
    tensorboard: bool = False   # also log metrics to RUN_DIR/tensorboard/ (experiments.tracking)

    def __post_init__(self) -> None:
        check_fields(self, "train")   # types and the bounds above
        check_device(self.device)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.grad_accum ({self.grad_accum}) must divide "
                             f"train.batch_size ({self.batch_size})")


#: built-in sharing strategies whose plans share no parameter among tasks (a gradient
#: weighting has nothing to combine there)
SHARES_NOTHING = ("none", "soft")

#: model keys that may differ from an ``init:`` checkpoint's
MAY_DIFFER = ("dropout", "attention_dropout", "attention_backend")


def init_kind(path: str | Path) -> Literal["hf", "run", "pretrain"]:
    """``hf`` for a Hugging Face model directory, ``run`` for a polytask run directory,
    ``pretrain`` for a ``polytask pretrain`` run directory (its config.json has a top-level
    ``pretrain`` section; its weights are one plain EncoderDecoder)."""
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
            return "pretrain" if isinstance(data.get("pretrain"), dict) else "run"
    raise ValueError(f"init: {path} holds neither a Hugging Face config.json (with model_type) "
                     "nor a polytask run's or pretraining run's config.json")


def init_model_config(path: str | Path, given: dict[str, Any] | None) -> ModelConfig:
    """The checkpoint's model config with the ``model:`` keys of the run config applied; a
    key that contradicts the checkpoint raises, naming both values."""
    if init_kind(path) == "hf":
        base = hf_model_config(path)
    else:
        saved = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["model"]
        base = from_dict(ModelConfig, saved, "model")
        if (Path(path) / "tokenizer.model").is_file():
            # a run that trained its own tokenizer built its model with the tokenizer's ids,
            # whatever its config's model.vocab_size said (experiments.build.build_run)
            tok = Tokenizer.load(Path(path) / "tokenizer.model")
            base = dataclasses.replace(base, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                       bos_id=tok.bos_id, eos_id=tok.eos_id)
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
    model: ModelConfig = field(default_factory=ModelConfig)  # the backbone's architecture
    tasks: str | list[TaskSpec] = "tiny"  # a built-in suite name or a list of task specs
    # parameter-sharing strategy and heads
    sharing: SharingConfig = field(default_factory=SharingConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)  # how task losses combine
    # options per task name or per loss name
    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    # sampling, lengths, tokenizer and evaluation data
    data: DataConfig = field(default_factory=DataConfig)
    # optimisation, evaluation, PEFT and device
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None  # a Hugging Face T5/BART or polytask run directory to start from
    # continual learning: task names trained stage after stage, e.g. [[copy], [reverse]]
    stages: list[list[str]] | None = None
    # replay and anchoring penalties of a run with stages
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def __post_init__(self) -> None:
        if self.stages is not None:
            self.stages = check_stages(self.stages, [s.name for s in self.specs()])
        # absolute positions have a row per position: a longer sequence fails mid-run
        if self.model.positions in ("learned", "sinusoidal"):
            lengths = {"data.max_source_len": self.data.max_source_len,
                       "data.max_target_len": self.data.max_target_len,
                       "train.generation_max_tokens": self.train.generation_max_tokens}
            for key, length in lengths.items():
                if length > self.model.max_length:
                    raise ValueError(
                        f"{key} = {length} exceeds model.max_length = {self.model.max_length} "
                        f"of the {self.model.positions} positions (a longer sequence would have "
                        "no position); lower it or raise model.max_length")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, resolve_init: bool = True) -> "RunConfig":
        """``resolve_init``: a user's config (True) — read an ``init:`` checkpoint's model
        config (see the module doc), then check the names and options of losses and weighting
        against the registries and the model's size against this machine's memory
        (:meth:`check_parts`); False for a run's own saved config.json, whose model section
        is already complete and whose registered names may come from a script not imported
        now (the training loop checks them again when it builds the parts)."""
        if not isinstance(data, dict):
            raise ValueError(f"a run config must be a mapping of sections, got {type(data).__name__}")
        unknown = [k for k in data if k not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown config section {unknown[0]!r}; known: "
                             f"{', '.join(SECTIONS)}")
        tasks = data.get("tasks", "tiny")
        if isinstance(tasks, list):
            tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
        elif not isinstance(tasks, str):
            raise ValueError(f"tasks must be a suite name or a list of task specs, got "
                             f"{short_repr(tasks)}")
        losses = data.get("losses") or {}
        if not isinstance(losses, dict) or not all(isinstance(v, dict) for v in losses.values()):
            raise ValueError(f"losses must map task or loss names to option mappings, got "
                             f"{short_repr(losses)}")
        init = data.get("init")
        if init is not None and not isinstance(init, str):
            raise ValueError(f"init = {init!r} must be a directory path")
        if init is not None and resolve_init:
            model = init_model_config(init, data.get("model"))
        else:
            model = from_dict(ModelConfig, data.get("model"), "model")
        cfg = cls(
            init=init,
            model=model,
            tasks=tasks,
            sharing=from_dict(SharingConfig, data.get("sharing"), "sharing"),
            weighting=from_dict(WeightingConfig, data.get("weighting"), "weighting"),
            losses=losses,
            data=from_dict(DataConfig, data.get("data"), "data"),
            train=from_dict(TrainConfig, data.get("train"), "train"),
            stages=data.get("stages"),
            continual=from_dict(ContinualConfig, data.get("continual"), "continual"),
        )
        if resolve_init:
            cfg.check_parts()
        return cfg

    def specs(self) -> list[TaskSpec]:
        """The task specs: the list given, or the built-in suite's (``tasks: <suite name>``)."""
        if isinstance(self.tasks, str):
            return load_suite(self.tasks)
        return list(self.tasks)

    def check_parts(self) -> None:
        """What the sections name, checked before anything is built: each task's loss and the
        weighting method are registered, their options are ones their constructors accept
        (:meth:`task_loss_options`, :meth:`polytask.losses.registry.Registry.check_options`),
        and the model's parameters fit this machine's memory
        (:func:`polytask.core.model.config.check_memory`, with the tokenizer's vocabulary
        ``data.vocab_size`` unless ``init:`` gives one)."""
        specs = self.specs()
        for s in specs:
            if s.loss_name not in LOSSES:
                raise ValueError(f"tasks[{s.name}].loss = {s.loss_name!r} is invalid: unknown "
                                 f"loss; known: {', '.join(LOSSES.names())}")
        self.task_loss_options(specs)
        method = self.weighting.method
        if method not in WEIGHTINGS:
            raise ValueError(f"weighting.method = {method!r} is invalid: unknown weighting; "
                             f"known: {', '.join(WEIGHTINGS.names())}")
        WEIGHTINGS.check_options(method, self.weighting.options, "weighting.options",
                                 positional=1)   # after the task names
        if (self.sharing.strategy in SHARES_NOTHING
                and issubclass(WEIGHTINGS.get(method), GradientWeighting)):
            raise ValueError(f"weighting.method = {method!r} combines the task gradients of the "
                             f"shared parameters, but sharing.strategy = "
                             f"{self.sharing.strategy!r} shares none; use a weighting of the "
                             f"losses (static, uncertainty, dwa, famo, rlw) or share parameters")
        self.model.check_memory(copies=len(specs), dtype=self.train.dtype,
                                vocab_size=None if self.init else self.data.vocab_size)

    def task_loss_options(self, specs: list[TaskSpec]) -> dict[str, dict[str, Any]]:
        """Task name -> keyword options of its loss, from ``losses:``. A key is a task's name
        (that task's options) or the name of a loss some task uses (the options of every such
        task without a key of its own). A key that is neither, an option the loss does not
        take, or a value of the wrong type raises, naming ``losses.<key>``."""
        loss_of = {s.name: s.loss_name for s in specs}
        used = sorted(set(loss_of.values()))
        for key, options in self.losses.items():
            if key not in loss_of and key not in used:
                raise ValueError(
                    f"losses.{key} names neither a task nor a loss of one; valid keys: the "
                    f"tasks {', '.join(loss_of)} or their losses {', '.join(used)}")
            LOSSES.check_options(loss_of.get(key, key), options, f"losses.{key}")
        return {s.name: dict(self.losses.get(s.name, self.losses.get(s.loss_name, {})))
                for s in specs}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.stages is None:   # a run without stages: its config.json as before
            out.pop("stages")
            if self.continual.stage is None:
                out.pop("continual")
        return json.loads(json.dumps(out))  # plain JSON types only


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate every section."""
    data = load_yaml(path)
    data.pop("grid", None)
    data.pop("seeds", None)
    return RunConfig.from_dict(apply_overrides(data, parse_overrides(overrides or [])))

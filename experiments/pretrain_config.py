"""The config of ``polytask pretrain``: self-supervised pretraining of the encoder-decoder on
raw text, whose run directory a later ``polytask train`` starts from (``init: RUN_DIR``).

```yaml
model:    {d_model: 64, ...}                # polytask.core.model.config.ModelConfig
pretrain: {corpus: builtin, objective: span_corruption, chunk_tokens: 96, ...}
data:     {vocab_size: 1000, tokenizer: unigram}
train:    {max_steps: 300, batch_size: 16, ...}   # experiments.config.TrainConfig
init:     path/to/pretrain-run               # optional: continue pretraining (its tokenizer)
```

Every section is a typed dataclass checked where its fields are declared (``bounds``), read
with :func:`polytask.experiments.config_files.load_yaml` and dotted ``key=value`` overrides.
``train:`` is the training loop's :class:`~polytask.experiments.config.TrainConfig`; its fields
that only mean something for task fine-tuning (PEFT, freezing, early stopping on a task metric,
generation) are refused rather than ignored. The saved ``config.json`` has a top-level
``pretrain`` key, by which ``init:`` tells a pretraining run from a task run
(:func:`polytask.experiments.config.init_kind`).
"""
from __future__ import annotations

import dataclasses
import json
# aliased: PretrainSection has a field named `field` (JSONL's text key), which would shadow it
from dataclasses import dataclass, field as setting
from pathlib import Path
from typing import Any, Literal

import numpy as np

from polytask.core.data.tokenizer import SEP_ID
from polytask.core.model.config import ModelConfig
from polytask.core.model.fields import bounds, check_fields, from_dict, short_repr
from polytask.core.training.manifest import read_json
from polytask.experiments.config import TrainConfig, init_kind, init_model_config
from polytask.experiments.config_files import apply_overrides as _apply, load_yaml, parse_overrides

#: the top-level sections of a pretraining config
PRETRAIN_SECTIONS = ("model", "pretrain", "data", "train", "init")
#: what ``pretrain.corpus`` may name instead of files: the shipped WordNet glosses
BUILTIN = "builtin"
#: settings a resumed pretraining run may change (none changes what its saved state means)
RESUMABLE = ("train.lr", "train.max_steps", "train.eval_every", "train.save_every",
             "train.max_bad_steps", "train.grad_clip", "train.tensorboard")


@dataclass
class PretrainSection:
    """What is read and how it is noised. ``span_corruption`` is T5's objective (Raffel et
    al. 2020, 3.1.4: spans replaced by sentinels, the target lists them); ``text_infilling``
    is BART's (Lewis et al. 2020, 2.2: Poisson-length spans replaced by one mask token, the
    target is the whole text)."""

    # text files (.txt[.gz]: one document a line; .jsonl[.gz]: `field` of each record) or
    # "builtin", the shipped corpus (experiments.suite.corpus)
    corpus: str | list[str] = BUILTIN
    field: str = "text"  # the text field of JSONL records
    # T5's span corruption or BART's text infilling
    objective: Literal["span_corruption", "text_infilling"] = "span_corruption"
    # span_corruption: fraction of tokens noised
    noise_density: float = setting(default=0.15, metadata=bounds(gt=0, lt=1))
    # span_corruption: mean length of a noise span
    mean_span_length: float = setting(default=3.0, metadata=bounds(ge=1))
    # text_infilling: fraction of tokens masked
    mask_ratio: float = setting(default=0.3, metadata=bounds(gt=0, lt=1))
    # text_infilling: Poisson mean of the span lengths
    poisson_lambda: float = setting(default=3.0, metadata=bounds(gt=0))
    chunk_tokens: int = setting(default=128, metadata=bounds(ge=2))  # token ids per example
    # sentinel pieces added to the tokenizer (span_corruption's <extra_id_N>; the first is
    # text_infilling's mask token)
    sentinels: int = setting(default=100, metadata=bounds(ge=0))
    shuffle_buffer: int = setting(default=1000, metadata=bounds(gt=0))  # chunks shuffled together
    # every N-th document is validation text, never trained on
    validation_every: int = setting(default=100, metadata=bounds(ge=2))
    eval_batches: int = setting(default=4, metadata=bounds(gt=0))  # fixed validation batches
    # the first N training documents train the tokenizer
    tokenizer_documents: int = setting(default=20000, metadata=bounds(gt=0))

    def __post_init__(self) -> None:
        check_fields(self, "pretrain")
        paths = [self.corpus] if isinstance(self.corpus, str) else self.corpus
        if not paths or any(not isinstance(p, str) or not p for p in paths):
            raise ValueError(f"pretrain.corpus = {short_repr(self.corpus)} must be "
                             f"{BUILTIN!r} or a non-empty list of file paths")
        if self.sentinels == 0:
            raise ValueError(f"pretrain.sentinels = 0 but pretrain.objective = "
                             f"{self.objective!r} needs sentinel pieces (span_corruption one per "
                             "span, text_infilling the first as its mask token); set it >= 1")
        spans = self.noise_spans()
        if self.objective == "span_corruption" and self.sentinels < spans:
            raise ValueError(f"pretrain.sentinels = {self.sentinels} but a chunk of "
                             f"pretrain.chunk_tokens = {self.chunk_tokens} has {spans} noise "
                             f"spans (noise_density {self.noise_density}, mean_span_length "
                             f"{self.mean_span_length}), one sentinel each; set it >= {spans}")

    def noise_spans(self) -> int:
        """Noise spans of a full chunk under span corruption (T5's counts, as
        :func:`polytask.core.data.noising.random_spans_noise_mask` draws them)."""
        n = self.chunk_tokens
        noise = int(np.round(np.float32(n) * np.float32(self.noise_density)))
        noise = min(max(noise, 1), n - 1)
        spans = int(np.round(np.float32(noise) / np.float32(self.mean_span_length)))
        return min(max(spans, 1), n - noise)

    def paths(self) -> list[Path]:
        """The corpus files (``builtin``: the shipped one), each checked to exist."""
        if self.corpus == BUILTIN:
            from polytask.experiments.suite.corpus import corpus_path
            found = [corpus_path()]
        else:
            found = [Path(p) for p in ([self.corpus] if isinstance(self.corpus, str)
                                       else self.corpus)]
        for path in found:
            if not path.is_file():
                raise ValueError(f"pretrain.corpus: {path}: no such file (give text or JSONL "
                                 f"files, or {BUILTIN!r} for the shipped corpus)")
        return found


@dataclass
class PretrainDataConfig:
    # sentencepiece vocabulary, special ids and sentinels included
    vocab_size: int = setting(default=1000, metadata=bounds(gt=SEP_ID + 1))
    tokenizer: Literal["unigram", "bpe"] = "unigram"  # sentencepiece model type
    # every digit its own piece (PaLM, LLaMA): numbers tokenize alike whatever the corpus held
    split_digits: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "data")


#: ``train:`` fields of task fine-tuning, with the value they must keep here
REFUSED_TRAIN = {"peft": {}, "train_top_layers": None, "train_only": [], "save_base": True,
                 "early_stopping_patience": None, "early_stopping_metric": "average_seen",
                 "generation_max_tokens": 48}


def _check_train(t: TrainConfig) -> None:
    for key, default in REFUSED_TRAIN.items():
        if getattr(t, key) != default:
            raise ValueError(f"train.{key} = {short_repr(getattr(t, key))} has no meaning in "
                             f"pretraining (it applies to `polytask train`); remove it. "
                             f"Pretraining uses no train.{', train.'.join(REFUSED_TRAIN)}")


@dataclass
class PretrainConfig:
    model: ModelConfig = setting(default_factory=ModelConfig)  # the EncoderDecoder's shape
    pretrain: PretrainSection = setting(default_factory=PretrainSection)  # corpus and objective
    data: PretrainDataConfig = setting(default_factory=PretrainDataConfig)  # the tokenizer
    train: TrainConfig = setting(default_factory=TrainConfig)  # optimisation and checkpoints
    init: str | None = None  # a pretraining run directory to continue (its tokenizer reused)

    def __post_init__(self) -> None:
        _check_train(self.train)
        p, m = self.pretrain, self.model
        # the decoder reads [bos] + targets: up to chunk_tokens + 1 positions
        if m.positions in ("learned", "sinusoidal") and p.chunk_tokens + 1 > m.max_length:
            raise ValueError(f"pretrain.chunk_tokens = {p.chunk_tokens} needs "
                             f"{p.chunk_tokens + 1} positions (the decoder's start token "
                             f"added) but model.max_length = {m.max_length} of the "
                             f"{m.positions} positions; lower pretrain.chunk_tokens or raise "
                             "model.max_length")
        if self.init is None and self.data.vocab_size <= SEP_ID + 1 + p.sentinels:
            raise ValueError(f"data.vocab_size = {self.data.vocab_size} leaves no pieces for "
                             f"text: {SEP_ID + 1} special ids and pretrain.sentinels = "
                             f"{p.sentinels} need more; raise data.vocab_size above "
                             f"{SEP_ID + 1 + p.sentinels} or lower pretrain.sentinels")

    @classmethod
    def from_dict(cls, data: Any, *, resolve_init: bool = True) -> "PretrainConfig":
        """``resolve_init``: a user's config — the model section comes from an ``init:``
        pretraining run (only ``MAY_DIFFER`` keys may differ); False for a run's own saved
        ``config.json``, whose model section is already complete."""
        if not isinstance(data, dict):
            raise ValueError(f"a pretrain config must be a mapping of sections, got "
                             f"{type(data).__name__}")
        unknown = [k for k in data if k not in PRETRAIN_SECTIONS]
        if unknown:
            raise ValueError(f"unknown pretrain config section {unknown[0]!r}; known: "
                             f"{', '.join(PRETRAIN_SECTIONS)}")
        init = data.get("init")
        if init is not None and not isinstance(init, str):
            raise ValueError(f"init = {short_repr(init)} must be a directory path")
        if init is not None and resolve_init:
            if init_kind(init) != "pretrain":
                raise ValueError(f"init: {init} is not a pretraining run directory (made by "
                                 "`polytask pretrain`); pretraining continues only those")
            model = init_model_config(init, data.get("model"))
        else:
            model = from_dict(ModelConfig, data.get("model"), "model")
        return cls(model=model, init=init,
                   pretrain=from_dict(PretrainSection, data.get("pretrain"), "pretrain"),
                   data=from_dict(PretrainDataConfig, data.get("data"), "data"),
                   train=from_dict(TrainConfig, data.get("train"), "train"))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted ``section.key`` overrides of a pretrain config (sections: :data:`PRETRAIN_SECTIONS`)."""
    return _apply(data, overrides, PRETRAIN_SECTIONS)


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a YAML pretraining config, apply ``key=value`` overrides, validate every section."""
    given = parse_overrides(overrides or [])
    return PretrainConfig.from_dict(apply_overrides(load_yaml(path), given))


def read_pretrain_config(run_dir: Path) -> PretrainConfig:
    """A pretraining run's saved ``config.json`` (checked against its manifest)."""
    path = Path(run_dir) / "config.json"
    saved = read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("pretrain"), dict):
        raise ValueError(f"{path}: not a pretraining run's config (no pretrain section)")
    try:
        return PretrainConfig.from_dict(saved, resolve_init=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def resume_pretrain_config(run_dir: Path, overrides: list[str]) -> PretrainConfig:
    """The saved config of ``run_dir`` with overrides of :data:`RESUMABLE` keys only."""
    given = parse_overrides(overrides)
    refused = [k for k in given if k not in RESUMABLE]
    if refused:
        raise ValueError(f"{refused[0]} cannot change when a pretraining run resumes (its "
                         f"checkpoints were trained with the saved value); --resume may change "
                         f"only {', '.join(RESUMABLE)}")
    saved = read_pretrain_config(run_dir).to_dict()
    return PretrainConfig.from_dict(apply_overrides(saved, given), resolve_init=False)

"""A run directory from the outside: resolve a config's tasks, train or resume a run, and load
a finished one to evaluate, generate from or export it.

A run directory holds ``config.json``, ``tokenizer.model``, ``metrics.jsonl``,
``model.safetensors``, ``best.safetensors``, ``summary.json`` and ``checkpoints/`` (and, with
``train.save_base: false``, ``base.json``: the ``init:`` checkpoint its weight files build on).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polytask.core.accelerate import accelerated
from polytask.core.data.collate import CollateReport, collate
from polytask.core.data.task_data import Example, apply_template, format_source
from polytask.core.data.tokenizer import Tokenizer
from polytask.core.decoding.generation import METHODS, generate
from polytask.core.export import export_model
from polytask.core.peft import unwrap_lora
from polytask.core.training.checkpoint import load_weights
from polytask.core.training.manifest import read_json, unverified_note, verify_file
from polytask.core.data.task_data import TaskData
from polytask.experiments.adapt import adapt, weight_names
from polytask.experiments.build import build_run, resolve_tasks  # noqa: F401 (resolve_tasks: public here too)
from polytask.experiments.config import RunConfig
from polytask.experiments.evaluate import eval_options, evaluate
from polytask.experiments.resume import read_run_config
from polytask.experiments.train import train
from polytask.heads.model import DECODER_HEADS, MultiTaskModel


def train_run(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
              progress: bool = True) -> dict[str, Any]:
    return train(cfg, resolve_tasks(cfg), Path(run_dir), resume=resume, progress=progress)


def metric_names(summary: dict[str, Any]) -> dict[str, str]:
    return dict(summary.get("metrics", {}))


#: the weight files ``--weights`` chooses between (what summary.json scored is ``best``)
WEIGHTS = {"best": "best.safetensors", "last": "model.safetensors"}


def weights_file(run_dir: Path, weights: str = "best") -> Path:
    """The weight file of ``weights``: ``best`` (best validation, what ``summary.json``,
    ``results.csv`` and ``table.md`` score) or ``last`` (the final step). A run that never
    validated has no ``best.safetensors``: ``best`` falls back to ``model.safetensors``
    (:func:`weights_note` says so). A run that did — its manifest lists the file, or its
    summary names a best step — and lost the file is an error naming it, never silently its
    last weights."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choices: {', '.join(WEIGHTS)}")
    run_dir = Path(run_dir)
    best, last = run_dir / WEIGHTS["best"], run_dir / WEIGHTS["last"]
    if weights == "last" or best.is_file():
        return run_dir / WEIGHTS[weights]
    verify_file(best)   # listed in the manifest: "missing (listed in ...)"
    summary = run_dir / "summary.json"
    recorded = read_json(summary) if summary.is_file() else {}
    step = recorded.get("best_step") if isinstance(recorded, dict) else None
    if step is not None:
        raise ValueError(f"{best}: missing, but {summary} scores the best validation weights "
                         f"(step {step}); put the file back, or use --weights last")
    return last


def weights_note(run_dir: Path, weights: str) -> str | None:
    """A line for the user when :func:`weights_file` falls back to another existing file,
    else None (a run without weight files fails when it loads)."""
    path = weights_file(run_dir, weights)
    if path.name == WEIGHTS[weights] or not path.is_file():
        return None
    return (f"{run_dir} has no {WEIGHTS[weights]} (it never validated); using "
            f"{path.name}")


def final_stage(run_dir: Path) -> Path:
    """A continual run (``stages:``, :mod:`polytask.experiments.continual`) keeps one run
    directory per stage, ``stage_0`` (the initial model) ... ``stage_T``, and no weights of its
    own: its last stage, with a note on stderr. Any other directory: itself."""
    stages = [p for p in run_dir.glob("stage_*") if p.name[6:].isdigit() and p.is_dir()]
    if not stages or (run_dir / WEIGHTS["last"]).exists():
        return run_dir
    last = max(stages, key=lambda p: int(p.name[6:]))
    print(f"polytask: note: {run_dir} is a continual run; using its last stage, {last}",
          file=sys.stderr, flush=True)
    return last


def load_run(run_dir: Path, *, merge: bool = True, weights: str = "best"
             ) -> tuple[RunConfig, TaskData, Tokenizer, MultiTaskModel]:
    """Config, data, tokenizer and model (eval mode) of a run directory, with the weights of
    :func:`weights_file`: ``best`` (the default: the weights the run's summary scores) or
    ``last``.

    The run's PEFT and freezing (``train.peft``, :func:`polytask.experiments.adapt.adapt`) are
    re-applied before the weights load, so the modules match the saved tensors. With ``merge``
    (the default) LoRA updates are then folded into their base weights and the wrappers
    removed (:func:`polytask.core.peft.unwrap_lora`): the plain module tree that inference,
    the fused decoding step and ONNX export want. Adapters and prompts have nothing to fold and
    stay; ``merge=False`` keeps LoRA separate too (to inspect or continue training it).

    A ``train.save_base: false`` run's base comes from its ``init:`` checkpoint (SHA-256
    checked against ``base.json`` by ``build_run``), and either weight file adds exactly the
    trained tensors to it (training saves both with the same names).

    Every file read is checked against the run's ``manifest.json``: a damaged or missing one
    is a ``ValueError`` naming it; a run written before manifests loads with a note on stderr.
    """
    run_dir = final_stage(Path(run_dir))
    path = weights_file(run_dir, weights)  # an unknown choice fails before the model is built
    cfg = read_run_config(run_dir)         # every file read is checked against the manifest
    note = unverified_note(run_dir)
    if note:
        print(f"polytask: note: {note}", file=sys.stderr, flush=True)
    data, tokenizer, model = build_run(cfg, resolve_tasks(cfg), run_dir, fresh_tokenizer=False)
    adapt(model, cfg)
    load_weights(path, model, weight_names(cfg, model))
    if merge:
        unwrap_lora(model)
    model.eval()
    return cfg, data, tokenizer, model


def evaluate_run(run_dir: Path, split: str = "test", *, weights: str = "best") -> dict[str, float]:
    """The run's metrics on ``split``, computed as the training loop computes them; with the
    default ``weights="best"`` they equal ``summary.json``'s."""
    cfg, data, tokenizer, model = load_run(run_dir, weights=weights)
    with accelerated(model):
        return evaluate(model, data, tokenizer, split, **eval_options(cfg, split))


def generate_text(run_dir: Path, task: str, text: str, *, instruction: str | None = None,
                  weights: str = "best", max_new_tokens: int | None = 48,
                  **options: Any) -> str:
    """The run's prediction for one input of ``task`` (:func:`predict_records`); ``options``
    are :class:`Decoding`'s. With ``num_sequences > 1`` the sequences are joined by newlines.
    ``max_new_tokens`` keeps this function's historical default, 48 (``polytask generate`` and
    ``None``: the run's ``train.generation_max_tokens``, as evaluation)."""
    cfg, data, tokenizer, model = load_run(run_dir, weights=weights)
    record = {"input": text} if instruction is None else {"input": text, "instruction": instruction}
    decodes = task in data.specs and data.specs[task].head_kind == "lm"
    decoding = Decoding(max_new_tokens=max_new_tokens if decodes else None, **options)
    out = predict_records(cfg, data, tokenizer, model, task, [record], decoding)[0]
    return out["prediction"] if "prediction" in out else "\n".join(out["predictions"])


@dataclass(frozen=True)
class Decoding:
    """How ``polytask generate`` decodes a generation task (``lm`` head); ``None`` = not given.

    ``greedy`` is what evaluation does. ``beam`` takes ``num_beams`` (default 4) and
    ``length_penalty`` (GNMT's alpha, default 1.0) and returns its best hypothesis only.
    ``sample`` takes ``temperature``, ``top_k``, ``top_p`` and ``seed`` (a fresh random seed
    when None; a fixed seed repeats the same samples) and draws ``num_sequences`` per input.
    ``max_new_tokens`` None: the run's ``train.generation_max_tokens`` (evaluation's). ``scores``:
    every label's score (classification tasks only). Options of another method are refused.
    """

    method: str = "greedy"
    num_beams: int | None = None
    length_penalty: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_sequences: int = 1
    max_new_tokens: int | None = None
    scores: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choices: {', '.join(METHODS)}")
        for method, names in (("beam", BEAM_OPTIONS), ("sample", SAMPLE_OPTIONS)):
            given = [n for n in names if getattr(self, n) is not None]
            if given and self.method != method:
                raise ValueError(f"{_flags(given)} only apply to --method {method}, "
                                 f"not {self.method}")
        if self.num_sequences < 1:
            raise ValueError(f"num_sequences ({self.num_sequences}) must be >= 1")
        if self.num_sequences > 1 and self.method != "sample":
            raise ValueError(f"num_sequences ({self.num_sequences}) > 1 needs --method sample; "
                             f"{self.method} gives one sequence (beam search keeps its best only)")

    def decoding_options(self) -> list[str]:
        """The options given that only a generation task uses."""
        given = [n for n in BEAM_OPTIONS + SAMPLE_OPTIONS + ("max_new_tokens",)
                 if getattr(self, n) is not None]
        return (["method"] if self.method != "greedy" else []) + given + (
            ["num_sequences"] if self.num_sequences != 1 else [])


BEAM_OPTIONS = ("num_beams", "length_penalty")
SAMPLE_OPTIONS = ("temperature", "top_k", "top_p", "seed")
INPUT_KEYS = ("input", "instruction")


def _flags(names: list[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def default_instruction(data: TaskData, task: str) -> str:
    """The instruction of a template-less task when a record gives none: the one that all the
    task's loaded records share (its training records', else its evaluation splits'). Records
    with different instructions leave no default: the caller must give one."""
    loaded = dict(data.examples[task])
    if task in data.held_out_train:  # a held-out task may have loaded no other split
        loaded.setdefault("train", data.held_out_train[task])
    split = next(iter(loaded), None)
    if split is None:
        raise ValueError(f"task {task!r} has no templates and no loaded records to take its "
                         "instruction from; give one with --instruction")
    found = sorted({ex.meta.get("instruction", "") for ex in loaded[split]})
    if len(found) != 1:
        raise ValueError(f"task {task!r} has no templates and its {split} records carry "
                         f"{len(found)} different instructions (e.g. {found[0]!r}); give one "
                         "with --instruction")
    return found[0]


def source_example(data: TaskData, task: str, record: dict[str, Any]) -> Example:
    """One input record (``input``, optional ``instruction``) as evaluation formats a record
    of ``task`` (:func:`polytask.core.data.task_data.load_task`, then the first template). A
    task with templates replaces the instruction, so giving one is refused; a task without
    takes the record's, else :func:`default_instruction`."""
    unknown = [k for k in record if k not in INPUT_KEYS]
    if unknown or not isinstance(record.get("input"), str):
        raise ValueError(f"an input record needs a string 'input' and may have 'instruction'; "
                         f"got keys {', '.join(map(repr, record))}")
    spec = data.specs[task]
    if spec.templates and "instruction" in record:
        raise ValueError(f"task {task!r} has templates (its first replaces the instruction, as "
                         "in evaluation): drop the instruction")
    instruction = record.get("instruction")
    if instruction is None:
        instruction = "" if spec.templates else default_instruction(data, task)
    meta = {"instruction": instruction, "input": record["input"]}
    raw = Example(task, format_source(instruction, record["input"]), "", None, meta)
    return apply_template(raw, spec)


def _check_task(data: TaskData, task: str, decoding: Decoding) -> None:
    if task not in data.specs:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(data.specs)}")
    head = data.specs[task].head_kind
    if head in ("classifier", "rank") and decoding.decoding_options():
        raise ValueError(f"task {task!r} has a {head} head: its label is chosen by scoring the "
                         f"labels, not by decoding; drop {_flags(decoding.decoding_options())}")
    if head == "lm" and decoding.scores:
        raise ValueError(f"--scores needs a classification task; {task!r} has an lm head")


@torch.no_grad()
def _predict_batch(cfg: RunConfig, data: TaskData, tokenizer: Tokenizer, model: MultiTaskModel,
                   task: str, batch: Any, decoding: Decoding,
                   generator: torch.Generator | None) -> list[dict[str, Any]]:
    """Predictions of one collated batch; the branches of
    :func:`polytask.experiments.evaluate.predict`, plus scores and decoding options."""
    spec = data.specs[task]
    if spec.head_kind == "classifier":
        logits = model(batch).tasks[task].logits  # (b, C)
        return _labelled(spec.labels, logits.argmax(-1), logits.log_softmax(-1), decoding.scores)
    if spec.head_kind == "rank":  # what model.predict_class runs, with the scores kept
        candidates = [tokenizer.encode(label) for label in spec.labels]
        choice, scores = model.head(task)(model.for_task(task), batch.src, batch.src_mask,
                                          candidates)
        return _labelled(spec.labels, choice, scores, decoding.scores)
    n = decoding.num_sequences
    options = {k: getattr(decoding, k) for k in BEAM_OPTIONS + SAMPLE_OPTIONS[:3]
               if getattr(decoding, k) is not None}
    ids = generate(model.for_task(task), batch.src.repeat_interleave(n, 0),
                   batch.src_mask.repeat_interleave(n, 0), method=decoding.method,
                   max_new_tokens=decoding.max_new_tokens or cfg.train.generation_max_tokens,
                   bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                   generator=generator, **options)
    texts = tokenizer.decode_batch(ids.tolist())
    if n == 1:
        return [{"prediction": t} for t in texts]
    return [{"predictions": texts[i:i + n]} for i in range(0, len(texts), n)]


def _labelled(labels: list[str], choice: torch.Tensor, scores: torch.Tensor,
              with_scores: bool) -> list[dict[str, Any]]:
    out = [{"prediction": labels[i]} for i in choice.tolist()]
    if with_scores:
        for row, s in zip(out, scores.tolist()):
            row["scores"] = dict(zip(labels, s))
    return out


def predict_records(cfg: RunConfig, data: TaskData, tokenizer: Tokenizer, model: MultiTaskModel,
                    task: str, records: list[dict[str, Any]], decoding: Decoding
                    ) -> list[dict[str, Any]]:
    """Each input record of ``task`` with its ``prediction`` (``predictions`` when
    ``num_sequences > 1``; ``scores``: every label's log-probability, or its rank score, with
    ``decoding.scores``), computed on evaluation's input path: sources by
    :func:`source_example`, batched and truncated as
    :func:`polytask.experiments.evaluate.predict` does; classifier and rank tasks choose their
    label as evaluation does; generation tasks decode with ``decoding``."""
    _check_task(data, task, decoding)
    limit = cfg.model.max_length
    if (decoding.max_new_tokens or 0) > limit and cfg.model.positions in ("learned", "sinusoidal"):
        raise ValueError(f"--max-new-tokens {decoding.max_new_tokens} exceeds model.max_length = "
                         f"{limit} of the run's {cfg.model.positions} positions (a longer output "
                         f"would have no position); use at most {limit}")
    examples = [source_example(data, task, r) for r in records]
    opts = eval_options(cfg)
    device = next(model.parameters()).device
    generator = None
    if decoding.method == "sample":
        seed = decoding.seed if decoding.seed is not None else torch.seed()
        generator = torch.Generator(device).manual_seed(seed)
    out: list[dict[str, Any]] = []
    with accelerated(model):
        for start in range(0, len(examples), opts["batch_size"]):
            chunk = examples[start:start + opts["batch_size"]]
            batch = collate(chunk, tokenizer, data.task_index,
                            max_source_len=opts["max_source_len"],
                            max_target_len=opts["max_target_len"], truncation="truncate",
                            report=CollateReport()).to(device)
            out += _predict_batch(cfg, data, tokenizer, model, task, batch, decoding, generator)
    return [{**r, **o} for r, o in zip(records, out)]


def export_run(run_dir: Path, out_dir: Path, tasks: list[str] | None = None, *,
               weights: str = "best") -> list[Path]:
    """Export a run to ONNX: one directory ``out_dir/<task>/`` per task that runs the decoder
    (``lm`` and ``rank`` heads), holding that task's ``for_task(name)`` view of the multi-task
    model (:func:`polytask.core.export.export_model`). Classifier tasks stop at the encoder
    and are skipped. ``tasks`` restricts the export; unknown names raise. ``weights``: as
    :func:`load_run`."""
    _, _, _, model = load_run(Path(run_dir), weights=weights)
    known = {t.name: t for t in model.tasks}
    for name in tasks or []:
        if name not in known:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(known)}")
    chosen = [known[n] for n in (tasks or known)]
    decoding = [t.name for t in chosen if t.head_kind in DECODER_HEADS]
    if not decoding:
        raise ValueError(f"no decoder task to export among {', '.join(t.name for t in chosen)}")
    paths: list[Path] = []
    for name in decoding:
        paths += export_model(model.for_task(name), Path(out_dir) / name)
    return paths

"""A run directory from the outside: resolve a config's tasks, train or resume a run, and load
a finished one to evaluate, generate from or export it.

A run directory holds ``config.json``, ``tokenizer.model``, ``metrics.jsonl``,
``model.safetensors``, ``best.safetensors``, ``summary.json`` and ``checkpoints/`` (and, with
``train.save_base: false``, ``base.json``: the ``init:`` checkpoint its weight files build on).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polytask.core.accelerate import accelerated
from polytask.core.data.task_data import Example, apply_template, format_source
from polytask.core.data.tokenizer import Tokenizer
from polytask.core.decoding.generation import generate
from polytask.core.export import export_model
from polytask.core.peft import unwrap_lora
from polytask.core.training.checkpoint import load_weights, read_json
from polytask.core.data.task_data import TaskData
from polytask.experiments.build import (adapt, build_run, resolve_tasks,  # noqa: F401 (resolve_tasks: public here too)
                                        weight_names)
from polytask.experiments.config import RunConfig
from polytask.experiments.evaluate import eval_options, evaluate
from polytask.experiments.train import train
from polytask.heads.model import DECODER_HEADS, MultiTaskModel


def train_run(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
              progress: bool = True) -> dict[str, Any]:
    return train(cfg, resolve_tasks(cfg), Path(run_dir), resume=resume, progress=progress)


def metric_names(summary: dict[str, Any]) -> dict[str, str]:
    return dict(summary.get("metrics", {}))


def load_run(run_dir: Path, *, merge: bool = True
             ) -> tuple[RunConfig, TaskData, Tokenizer, MultiTaskModel]:
    """Config, data, tokenizer and model (final weights, eval mode) of a run directory.

    The run's PEFT and freezing (``train.peft``, :func:`polytask.experiments.build.adapt`) are
    re-applied before the weights load, so the modules match the saved tensors. With ``merge``
    (the default) LoRA updates are then folded into their base weights and the wrappers
    removed (:func:`polytask.core.peft.unwrap_lora`): the plain module tree that inference,
    the fused decoding step and ONNX export want. Adapters and prompts have nothing to fold and
    stay; ``merge=False`` keeps LoRA separate too (to inspect or continue training it).

    A ``train.save_base: false`` run's base comes from its ``init:`` checkpoint (SHA-256
    checked against ``base.json`` by ``build_run``), and ``model.safetensors`` adds exactly
    the trained tensors to it.
    """
    cfg = RunConfig.from_dict(read_json(run_dir / "config.json"), resolve_init=False)
    data, tokenizer, model = build_run(cfg, resolve_tasks(cfg), run_dir, fresh_tokenizer=False)
    adapt(model, cfg)
    load_weights(run_dir / "model.safetensors", model, weight_names(cfg, model))
    if merge:
        unwrap_lora(model)
    model.eval()
    return cfg, data, tokenizer, model


def evaluate_run(run_dir: Path, split: str = "test") -> dict[str, float]:
    """The run's metrics on ``split``, computed as the training loop computes them."""
    cfg, data, tokenizer, model = load_run(run_dir)
    with accelerated(model):
        return evaluate(model, data, tokenizer, split, **eval_options(cfg))


def generate_text(run_dir: Path, task: str, text: str, *, method: str = "greedy",
                  max_new_tokens: int = 48) -> str:
    """The run's output for one input of ``task``, formatted with the task's first template."""
    cfg, data, tokenizer, model = load_run(run_dir)
    if task not in data.specs:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(data.specs)}")
    spec = data.specs[task]
    raw = Example(task, source=format_source(text), target="", meta={"input": text})
    src = torch.tensor([tokenizer.encode_source(apply_template(raw, spec).source)])
    ids = generate(model.for_task(task), src, max_new_tokens=max_new_tokens, method=method,
                   bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return tokenizer.decode(ids[0].tolist())


def export_run(run_dir: Path, out_dir: Path, tasks: list[str] | None = None) -> list[Path]:
    """Export a run to ONNX: one directory ``out_dir/<task>/`` per task that runs the decoder
    (``lm`` and ``rank`` heads), holding that task's ``for_task(name)`` view of the multi-task
    model (:func:`polytask.core.export.export_model`). Classifier tasks stop at the encoder
    and are skipped. ``tasks`` restricts the export; unknown names raise."""
    _, _, _, model = load_run(Path(run_dir))
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

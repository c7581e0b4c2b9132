"""Continual learning: a run's tasks trained stage after stage (``stages:`` in the run config).

Every stage is a plain ``polytask train`` run in its own directory ``RUN/stage_<i>``, so eval,
generate and resume work on it as on any run:

- ``stage_0``: the initial model (stage 1's run with ``train.max_steps: 0``: the same
  tokenizer and seeded weights stage 1 starts from), evaluated for forward transfer's baseline;
- ``stage_i`` (i = 1..T): a run of ``stages[i-1]``'s tasks initialised (``init:``) from
  ``stage_{i-1}`` (stage 1 from the run's own ``init:``, if any). Its config lists *every*
  task of the run; those of other stages are ``held_out`` (loaded, never sampled), so its test
  scores every task, seen and not yet seen: row i of the accuracy matrix.

A stage adds to the plain run only what :class:`StageHooks` gives the training loop: the
earlier tasks' private parameters (their heads) carried over from the previous stage (``init:``
carries only the backbone), ``continual.replay`` of each batch's rows drawn from the earlier
stages' training data, and the anchoring penalty (:mod:`polytask.losses.anchoring`): L2 to
the previous stage's weights, or EWC with one anchor per earlier stage (the multiple-penalty
form), the stage's weights and diagonal Fisher saved in ``stage_i/anchor.safetensors``. With
replay 0 and no penalty a stage *is* a run chained by ``init:``. The tokenizer is trained on
stage 1's training texts (and every task's templates): later tasks' data are not seen early.

``RUN/config.json`` is the run config as given; ``RUN/summary.json`` is the last stage's
summary (every task counted as seen: ``average_seen`` over all) plus ``continual`` (:func:`polytask.experiments.continual_metrics.continual_summary`),
whose average, backward and forward transfer also appear in ``test`` as ``continual/...``
for the ablation table. ``--resume RUN`` skips finished stages and resumes the current one.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from polytask.core.data.collate import CollateReport, collate
from polytask.core.data.sampling import MixtureSampler
from polytask.core.data.task_data import TaskData, apply_template
from polytask.core.training.checkpoint import holds_checkpoints, load_weights
from polytask.core.training.manifest import atomic_write, read_json, write_json
from polytask.experiments.adapt import adapt, weight_names
from polytask.experiments.build import build_run
from polytask.experiments.config import MAY_DIFFER, RunConfig
from polytask.experiments.continual_metrics import continual_summary
from polytask.heads.model import MultiTaskModel
from polytask.heads.objective import MultiTaskObjective
from polytask.losses import WEIGHTINGS
from polytask.losses.anchoring import Anchor, anchor_penalty, diagonal_fisher
from polytask.losses.weighting import GradientWeighting

ANCHOR = "anchor.safetensors"


def stage_dir(run_dir: Path, i: int) -> Path:
    return Path(run_dir) / f"stage_{i}"


def stage_config(cfg: RunConfig, i: int, run_dir: Path) -> RunConfig:
    """The plain run config of stage ``i`` (0: the initial model): every task, those outside
    the stage held out; from the previous stage's directory after stage 1."""
    stages = cfg.stages or []
    trained = set(stages[max(i, 1) - 1])
    data = cfg.to_dict()
    data.pop("stages", None)
    data["continual"] = {"stage": i}
    data["tasks"] = [{**dataclasses.asdict(s), "held_out": s.name not in trained}
                     for s in cfg.specs()]
    if i == 0:
        data["train"]["max_steps"] = 0
    if i >= 2:
        data["init"] = str(stage_dir(run_dir, i - 1).resolve())
        data["model"] = {k: v for k, v in data["model"].items() if k in MAY_DIFFER}
    return RunConfig.from_dict(data)


def weights_path(run_dir: Path) -> Path:
    """What a finished run scored and what ``init:`` loads: best, else last weights."""
    best = Path(run_dir) / "best.safetensors"
    return best if best.is_file() else Path(run_dir) / "model.safetensors"


def private_names(model: MultiTaskModel, tasks: list[str]) -> list[str]:
    """The parameter names private to ``tasks`` (their heads; under ``sharing: none`` their
    columns too): not shared with any other task."""
    shared = {id(p) for p in model.shared_parameters()}
    mine = {id(p) for t in tasks for p in model.task_parameters(t)} - shared
    others = {id(p) for t in model.task_index if t not in tasks for p in model.task_parameters(t)}
    return [n for n, p in model.named_parameters() if id(p) in mine - others]


@dataclass
class StageHooks:
    """What a stage adds to a plain run (used by :func:`polytask.experiments.train.train`)."""

    earlier: list[str]              # tasks of the earlier stages (replayed, heads carried over)
    replay: float                   # fraction of each batch's rows from ``earlier``
    previous: Path | None           # the previous stage's run directory
    anchors: list[Anchor]
    weight: float                   # lambda of the penalty

    def carry_over(self, model: MultiTaskModel) -> None:
        """Load the earlier tasks' private tensors (heads) from the previous stage: a fresh
        stage's ``init:`` gives only the backbone."""
        if self.previous is None:
            return
        names = private_names(model, self.earlier)
        if not names:
            return
        path = weights_path(self.previous)
        saved = load_file(str(path))
        missing = [n for n in names if n not in saved]
        if missing:
            raise ValueError(f"{path}: lacks {missing[0]}, a tensor of an earlier stage's task; "
                             "the stages must share one model layout")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])

    def replay_rows(self, micro: int) -> int:
        """Rows of a micro-batch of ``micro`` drawn from earlier stages: round(replay x micro)
        (at most micro - 1: every batch keeps a row of the stage's own tasks)."""
        if not self.earlier or self.replay == 0:
            return 0
        return min(micro - 1, round(self.replay * micro))

    def replay_sampler(self, data: TaskData, cfg: RunConfig, rank: int, world: int
                       ) -> MixtureSampler | None:
        """A deterministic sampler over the earlier tasks' training examples (its own stream:
        the seed's, shifted, so the stage's own rows are drawn as without replay)."""
        if not self.earlier or self.replay == 0:
            return None
        sizes = {t: len(data.demonstrations(t)) for t in self.earlier}
        return MixtureSampler(sizes, cfg.data.sampling, temperature=cfg.data.temperature,
                              seed=cfg.train.seed + 1, rank=rank, world_size=world)

    def penalty(self, model: MultiTaskModel) -> torch.Tensor | None:
        if not self.anchors or self.weight == 0:
            return None
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return anchor_penalty(params, self.anchors, self.weight)


def replay_examples(data: TaskData, pairs: list[tuple[str, int]], seeds: list[int]) -> list:
    """Earlier-stage training rows (held out in this stage's config), templated as training
    rows are."""
    return [apply_template(data.demonstrations(t)[i], data.specs[t], random.Random(seed))
            for (t, i), seed in zip(pairs, seeds)]


def continual_terms(stage: StageHooks, names: list[str], model: MultiTaskModel,
                    task_losses: dict[str, torch.Tensor], extra: torch.Tensor | None,
                    logs: dict[str, float]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A stage's additions to a training step: the replayed earlier tasks' losses (tasks not
    in ``names``, the stage's own) and the anchoring penalty join the extra loss, each with
    weight 1, outside the task weighting (which weights the stage's own tasks)."""
    terms = [] if extra is None else [extra]
    for name in [k for k in task_losses if k not in names]:
        loss = task_losses.pop(name)
        logs[f"replay_loss/{name}"] = float(loss.detach())
        terms.append(loss)
    penalty = stage.penalty(model)
    if penalty is not None:
        logs["continual/penalty"] = float(penalty.detach())
        terms.append(penalty)
    return task_losses, (sum(terms[1:], terms[0]) if terms else None)


def stage_anchor(cfg: RunConfig, run_dir: Path, tasks: list[str], later: list[str],
                 fisher_examples: int | None) -> Anchor:
    """The finished stage's weights (not the later tasks' fresh heads) and, with
    ``fisher_examples`` (EWC), the empirical diagonal Fisher of its tasks over that many
    training examples (task k, example m: the examples are
    taken in turn from each task, in order; its first template), each example's
    log-likelihood being minus its training loss (a token-reduced loss: the mean per-token
    log-likelihood), with the model in eval mode (no dropout)."""
    specs = cfg.specs()
    data, tokenizer, model = build_run(cfg, specs, run_dir, fresh_tokenizer=False)
    adapt(model, cfg)
    load_weights(weights_path(run_dir), model, weight_names(cfg, model))
    model.eval()
    skip = set(private_names(model, later))
    params = {n: p for n, p in model.named_parameters() if n not in skip and p.requires_grad}
    theta = {n: p.detach().clone() for n, p in params.items()}
    if fisher_examples is None:
        return Anchor(theta)
    objective = MultiTaskObjective(specs, cfg.sharing, cfg.task_loss_options(specs))
    report = CollateReport()

    def log_likelihood(task: str, index: int) -> Callable[[], torch.Tensor]:
        def value() -> torch.Tensor:
            batch = collate([data.get(task, "train", index)], tokenizer, data.task_index,
                            max_source_len=cfg.data.max_source_len,
                            max_target_len=cfg.data.max_target_len, truncation="truncate",
                            report=report).to(cfg.train.device)
            return -objective(model, model(batch), batch).task_losses[task]
        return value

    n = fisher_examples
    sizes = {t: len(data.examples[t]["train"]) for t in tasks}
    order = [(tasks[m % len(tasks)], (m // len(tasks)) % sizes[tasks[m % len(tasks)]])
             for m in range(n)]
    fisher = diagonal_fisher(params, (log_likelihood(t, i) for t, i in order))
    return Anchor(theta, fisher)


def save_anchor(path: Path, anchor: Anchor) -> None:
    tensors = {f"theta.{n}": t.contiguous() for n, t in anchor.theta.items()}
    if anchor.fisher is not None:
        tensors.update({f"fisher.{n}": t.contiguous() for n, t in anchor.fisher.items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp), track=True)


def load_anchor(path: Path, with_fisher: bool) -> Anchor:
    tensors = load_file(str(path))
    theta = {k[len("theta."):]: v for k, v in tensors.items() if k.startswith("theta.")}
    fisher = {k[len("fisher."):]: v for k, v in tensors.items() if k.startswith("fisher.")}
    if with_fisher and set(fisher) != set(theta):
        raise ValueError(f"{path}: holds no Fisher for every anchored tensor (an L2 anchor?); "
                         "continual.regularization = ewc needs one: delete the file to recompute")
    return Anchor(theta, fisher if with_fisher else None)


def check_continual(cfg: RunConfig) -> None:
    c = cfg.continual
    active = c.replay > 0 or (c.regularization != "none" and c.weight > 0)
    method = cfg.weighting.method
    if active and method in WEIGHTINGS and issubclass(WEIGHTINGS.get(method),
                                                      GradientWeighting):
        raise ValueError(f"weighting.method = {method!r} forms per-task gradients of the stage's "
                         "tasks alone; continual.replay and continual.regularization need a "
                         "weighting of the losses (static, uncertainty, dwa, famo, rlw)")


def _done(directory: Path) -> bool:
    path = directory / "summary.json"
    return path.is_file() and read_json(path).get("status") == "ok"


def train_stages(cfg: RunConfig, run_dir: Path, *, resume: bool, progress: bool,
                 train_stage: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Train every stage in turn (``train_stage``: :func:`polytask.experiments.train.train`,
    passed in because it dispatches here); returns and writes ``RUN/summary.json``."""
    check_continual(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("stages: a continual run trains in one process; run it without "
                         "torchrun (WORLD_SIZE > 1)")
    run_dir = Path(run_dir)
    stages, c = cfg.stages or [], cfg.continual
    if not resume and (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with `polytask train "
                         f"--resume {run_dir}` or train into another --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(run_dir / "config.json", cfg.to_dict(), track=True)
    tasks = [s.name for s in cfg.specs()]
    summaries, anchors = [], []
    for i in range(len(stages) + 1):
        directory, stage_cfg = stage_dir(run_dir, i), stage_config(cfg, i, run_dir)
        earlier = [t for s in stages[:max(i, 1) - 1] for t in s]
        later = [t for s in stages[max(i, 1):] for t in s]
        hooks = StageHooks(earlier, c.replay, stage_dir(run_dir, i - 1) if i >= 2 else None,
                           list(anchors), c.weight)
        if not _done(directory):
            directory.mkdir(parents=True, exist_ok=True)
            train_stage(stage_cfg, stage_cfg.specs(), directory, resume=holds_checkpoints(
                directory), progress=progress, stage=hooks if i >= 1 else None)
        summaries.append(read_json(directory / "summary.json"))
        if i >= 1 and c.regularization != "none" and i < len(stages):
            path = directory / ANCHOR
            if not path.is_file():
                anchor = stage_anchor(stage_cfg, directory, stages[i - 1], later,
                                      c.fisher_examples if c.regularization == "ewc" else None)
                save_anchor(path, anchor)
            anchor = load_anchor(path, c.regularization == "ewc")
            anchors = anchors + [anchor] if c.regularization == "ewc" else [anchor]
    matrix = [[float(s["test"][t]) for t in tasks] for s in summaries]
    result = continual_summary(matrix, tasks, stages)
    summary = dict(summaries[-1])
    # every task was trained in its stage: none is held out of the run as a whole
    test = {k: v for k, v in summary["test"].items() if k not in ("average_held_out", "average")}
    test["average_seen"] = result["average"]
    summary["test"] = {**test, **{f"continual/{k}": result[k] for k in (
        "average", "backward_transfer", "forward_transfer") if result[k] is not None}}
    summary["held_out"] = []
    summary["continual"] = result
    write_json(run_dir / "summary.json", summary)
    return summary

"""A run's parts, built from its config: data, tokenizer and model (:func:`build_run`, shared
by training, evaluation, generation and export), and what the training loop adds to them —
objective, task weighting, optimiser, schedule, sampler (:func:`build_parts`)."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from polytask import losses
from polytask.core.data.collate import CollateReport
from polytask.core.data.sampling import MixtureSampler
from polytask.core.data.task_data import TaskData
from polytask.core.data.tasks import TaskSpec
from polytask.core.data.tokenizer import Tokenizer
from polytask.core.training import distributed
from polytask.core.training.optim import freeze, lr_lambda, make_optimizer
from polytask.experiments.config import RunConfig
from polytask.heads import build_model
from polytask.heads.model import MultiTaskModel
from polytask.heads.objective import MultiTaskObjective
from polytask.losses.weighting import Weighting


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_corpus(data: TaskData) -> list[str]:
    """The training texts (sources with filled templates, targets, label words); held-out
    tasks' evaluation texts are never seen."""
    return list(data.corpus())


def build_run(cfg: RunConfig, specs: list[TaskSpec], run_dir: Path, *, fresh_tokenizer: bool,
              rank: int = 0) -> tuple[TaskData, Tokenizer, MultiTaskModel]:
    """Data, tokenizer and model for a run directory. With ``fresh_tokenizer`` the tokenizer
    is trained on the run's training texts and saved there (under data parallelism by rank 0;
    the others load it), otherwise loaded from it. The model's initialisation depends on
    ``train.seed`` only."""
    data = TaskData.load(specs)
    tok_path = run_dir / "tokenizer.model"
    if fresh_tokenizer and rank == 0:
        tokenizer = Tokenizer.train(tokenizer_corpus(data), cfg.data.vocab_size,
                                    model_type=cfg.data.tokenizer)
        tokenizer.save(tok_path)
    distributed.barrier()
    if not (fresh_tokenizer and rank == 0):
        tokenizer = Tokenizer.load(tok_path)
    model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    seed_everything(cfg.train.seed)
    model = build_model(model_cfg, specs, cfg.sharing).to(
        device=cfg.train.device, dtype=getattr(torch, cfg.train.dtype))
    return data, tokenizer, model


@dataclass
class Parts:
    """What the training loop needs besides data, tokenizer and model."""

    names: list[str]                       # the tasks trained on (held-out ones excluded)
    reductions: dict[str, str]             # task -> loss reduction (token / sequence)
    objective: MultiTaskObjective
    weighting: Weighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: MixtureSampler
    template_rng: random.Random
    trainable: list[torch.nn.Parameter]
    shared: list[torch.nn.Parameter]       # what gradient surgery acts on
    last_shared: list[torch.nn.Parameter] | None   # GradNorm's W
    report: CollateReport


def build_parts(cfg: RunConfig, specs: list[TaskSpec], data: TaskData, model: MultiTaskModel,
                *, rank: int = 0, world: int = 1) -> Parts:
    """PEFT and freezing applied to ``model`` (``train.peft``, ``train.train_only``,
    ``train.train_top_layers``), then the objective, the weighting (its per-task gradients
    averaged across ranks under data parallelism), AdamW and its schedule, and the task
    sampler of this rank."""
    t = cfg.train
    if t.peft:
        from polytask.core.peft import apply_peft
        options = dict(t.peft)
        apply_peft(model, options.pop("method", "lora"), **options)
    if t.train_top_layers is not None or t.train_only:
        n_layers = {"encoder": cfg.model.n_encoder_layers, "decoder": cfg.model.n_decoder_layers}
        freeze(model, train_top_layers=t.train_top_layers, train_only=t.train_only,
               n_layers=n_layers)
    names = data.train_tasks
    loss_options = {s.name: cfg.losses.get(s.name, cfg.losses.get(s.loss_name, {})) for s in specs}
    objective = MultiTaskObjective(specs, cfg.sharing, loss_options)
    reducer = {"gradient_reducer": distributed.average} if world > 1 else {}
    weighting = losses.get_weighting(cfg.weighting.method)(names, **cfg.weighting.options, **reducer)
    weighting.to(device=t.device, dtype=getattr(torch, t.dtype))
    params = list(model.named_parameters()) + list(weighting.named_parameters())
    optimizer = make_optimizer(params, lr=t.lr, weight_decay=t.weight_decay,
                               betas=tuple(t.betas), device=torch.device(t.device))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup=t.warmup_steps, total=t.max_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio))
    sampler = MixtureSampler(data.sizes("train"), cfg.data.sampling, temperature=cfg.data.temperature,
                             cap=data.caps or cfg.data.cap, seed=t.seed, rank=rank, world_size=world)
    return Parts(
        names=names,
        reductions={n: o.get("reduction", "token") for n, o in loss_options.items()},
        objective=objective,
        weighting=weighting, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
        template_rng=random.Random(t.seed),
        trainable=[p for _, p in params if p.requires_grad],
        shared=[p for p in model.shared_parameters() if p.requires_grad],
        last_shared=[p for p in model.last_shared_parameters() if p.requires_grad] or None,
        report=CollateReport())

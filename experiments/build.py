"""A run's parts, built from its config: data, tokenizer and model (:func:`build_run`, shared
by training, evaluation, generation and export), and what the training loop adds to them —
objective, task weighting, optimiser, schedule, sampler (:func:`build_parts`).

A run with ``train.save_base: false`` keeps only what it trained (:func:`trained_names`) in its
weight files and names its base in ``base.json`` (:func:`record_base`, with the SHA-256 of the
base's weights); :func:`build_run` rebuilds that base for a saved run after checking the
digests (:func:`verified_base`), so the caller loads the partial weights onto it."""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polytask import losses
from polytask.core.data.collate import CollateReport
from polytask.core.data.sampling import MixtureSampler
from polytask.core.data.task_data import TaskData
from polytask.core.data.tasks import TaskSpec
from polytask.core.data.pretrained_tokenizers import load_tokenizer
from polytask.core.data.tokenizer import TextTokenizer, Tokenizer
from polytask.core.interop import from_hf, weight_files
from polytask.core.model.transformer import EncoderDecoder
from polytask.core.peft import describe_counts, parameter_counts, unwrap_lora
from polytask.core.training.checkpoint import load_weights
from polytask.core.training.manifest import (atomic_write, read_json, record_files, sha256,
                                             unverified_note, verify_file, verify_listed,
                                             write_json)
from polytask.core.training import distributed
from polytask.core.training.optim import lr_lambda, make_optimizer
from polytask.experiments.adapt import adapt, weight_names
from polytask.experiments.config import MAY_DIFFER, RunConfig, init_kind, init_model_config
from polytask.experiments.evaluate import check_held_out_columns
from polytask.heads import build_model
from polytask.heads.experts import MIXTURES
from polytask.heads.model import DECODER_HEADS, MultiTaskModel
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


def resolve_tasks(cfg: RunConfig) -> list[TaskSpec]:
    """``tasks: <suite name>`` -> the built-in suite's specs; a list is used as given."""
    if isinstance(cfg.tasks, str):
        from polytask.experiments.suite import load_suite
        return load_suite(cfg.tasks)
    return list(cfg.tasks)


def load_run_tokenizer(run_dir: Path) -> TextTokenizer:
    """A run's tokenizer: ``tokenizer.model`` (trained on the run's tasks) or ``tokenizer/``
    (a pretrained checkpoint's, copied there by :func:`build_run`), checked against the run's
    manifest first: a damaged file is named, never loaded."""
    path = run_dir / "tokenizer.model"
    if path.is_file():
        verify_file(path)
        try:
            return Tokenizer.load(path)
        except ValueError as err:   # the tokenizer's own message may not name the file
            raise ValueError(str(err) if str(path) in str(err) else f"{path}: {err}") from None
    if (run_dir / "tokenizer").is_dir():
        verify_listed(run_dir, "tokenizer/")
        return load_tokenizer(run_dir / "tokenizer")
    verify_file(path)   # listed in the manifest: "missing"
    raise ValueError(f"{run_dir}: no tokenizer.model and no tokenizer/ directory")


def init_tokenizer(init: str) -> TextTokenizer:
    """The tokenizer of an ``init:`` checkpoint (a Hugging Face directory's own, or a run's or
    pretraining run's ``tokenizer.model``, checked against its manifest)."""
    return load_tokenizer(Path(init)) if init_kind(init) == "hf" else load_run_tokenizer(Path(init))


def init_backbone(init: str) -> EncoderDecoder:
    """The weights an ``init:`` checkpoint gives every task's backbone: a Hugging Face model, or
    a polytask run's first task's EncoderDecoder (its best weights when it kept them; under
    hard sharing this is the shared backbone), or a ``polytask pretrain`` run's EncoderDecoder
    (its model config with its tokenizer's ids; its best validation weights when it kept them)."""
    path = Path(init)
    kind = init_kind(path)
    if kind == "hf":
        return from_hf(path)
    if kind == "pretrain":
        backbone = EncoderDecoder(init_model_config(path, None))
        [weights] = base_weight_files(path)
        load_weights(weights, backbone)   # every tensor, checked against its manifest
        return backbone
    cfg = RunConfig.from_dict(read_json(path / "config.json"), resolve_init=False)
    if cfg.sharing.strategy in MIXTURES or cfg.sharing.adapters:
        what = (f"sharing.strategy {cfg.sharing.strategy!r}" if cfg.sharing.strategy in MIXTURES
                else "sharing.adapters")
        raise ValueError(f"init: {path} was trained with {what}: its layers hold per-task "
                         "gates or adapters, not a plain backbone; start from its own init: "
                         "instead, or from a run without them")
    method = cfg.train.peft.get("method")
    if method not in (None, "lora", "bitfit"):
        raise ValueError(f"init: {path} was trained with train.peft method {method!r}, whose "
                         "weights are not a plain backbone; start from its base checkpoint "
                         "(its own init) instead, or from a LoRA, BitFit or full run")
    _, _, model = build_run(cfg, resolve_tasks(cfg), path, fresh_tokenizer=False)
    adapt(model, cfg)                       # the run's modules, so its tensors load
    [weights] = base_weight_files(path)
    load_weights(weights, model, weight_names(cfg, model))
    unwrap_lora(model)                      # LoRA folded into the base weights
    # the first task that runs the decoder (a classifier task's column has none)
    first = next((t for t in model.tasks if t.head_kind in DECODER_HEADS), model.tasks[0])
    return model.for_column(first.name)


BASE_MANIFEST = "base.json"


def base_weight_files(init: str | Path) -> list[Path]:
    """The file(s) an ``init:`` checkpoint's weights come from: a Hugging Face directory's
    ``model.safetensors``, else every shard its ``model.safetensors.index.json`` names (what
    :func:`polytask.core.interop.from_hf` reads); a run's ``best.safetensors`` when it kept
    one, else its ``model.safetensors`` (what :func:`init_backbone` loads); a pretraining
    run's likewise."""
    path = Path(init)
    if init_kind(path) in ("run", "pretrain"):
        best = path / "best.safetensors"
        return [best if best.is_file() else path / "model.safetensors"]
    return weight_files(path)


def _digests(init: str | Path) -> dict[str, str]:
    """File name -> SHA-256 of the ``init:`` checkpoint's weights (``"no such file"``)."""
    return {f.name: sha256(f) if f.is_file() else "no such file" for f in base_weight_files(init)}


def record_base(init: str, run_dir: Path) -> None:
    """Write ``run_dir/base.json``: the ``init:`` checkpoint as given and as an absolute path,
    its kind (``hf`` or ``run``) and the SHA-256 of each of its weights files."""
    write_json(run_dir / BASE_MANIFEST, {"init": init, "path": str(Path(init).resolve()),
                                         "kind": init_kind(init), "sha256": _digests(init)},
               track=True)


def verified_base(run_dir: Path) -> str:
    """The ``init:`` checkpoint that a ``train.save_base: false`` run's weight files build on
    (its path as given, else its absolute path), after checking that its weights files have
    the SHA-256 digests recorded in ``base.json``: the partial weights fit that base alone.
    A missing or changed base raises, naming the file and both digests."""
    manifest = read_json(run_dir / BASE_MANIFEST)
    advice = (f"{run_dir} holds only its trained tensors (train.save_base = false), which fit "
              f"that base alone: put the original base checkpoint back at {manifest['path']}, "
              "or retrain the run")
    where = next((p for p in (manifest["init"], manifest["path"]) if Path(p).is_dir()), None)
    if where is None:
        files = ", ".join(f"{name} with SHA-256 {d}" for name, d in manifest["sha256"].items())
        raise ValueError(f"{manifest['path']}: the base checkpoint of {run_dir} is missing "
                         f"(expected {files}); {advice}")
    found = _digests(where)
    for name in sorted(set(manifest["sha256"]) | set(found)):
        want, got = manifest["sha256"].get(name, "no such file"), found.get(name, "no such file")
        if want != got:
            raise ValueError(f"{Path(where) / name}: the base checkpoint changed since {run_dir} "
                             f"was trained: expected SHA-256 {want} (its {BASE_MANIFEST}), found "
                             f"{got}; {advice}")
    return where


def _check_init(cfg: RunConfig, backbone: EncoderDecoder, tokenizer: TextTokenizer) -> None:
    """The checkpoint's weights and tokenizer fit the run's model config."""
    ours, theirs = cfg.model.to_dict(), backbone.config.to_dict()
    wrong = [k for k in ours if k not in MAY_DIFFER and ours[k] != theirs[k]]
    if wrong:
        raise ValueError(f"init: {cfg.init}: the weights have {', '.join(f'{k} = {theirs[k]!r}' for k in wrong)}"
                         f" where its config.json gives {', '.join(f'{ours[k]!r}' for k in wrong)}")
    for name in ("pad_id", "bos_id", "eos_id"):
        if getattr(tokenizer, name) != getattr(cfg.model, name):
            raise ValueError(f"init: {cfg.init}: the tokenizer's {name} is "
                             f"{getattr(tokenizer, name)}, the model's {getattr(cfg.model, name)}")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"init: {cfg.init}: the tokenizer has {tokenizer.vocab_size} ids, the "
                         f"model's vocabulary {cfg.model.vocab_size}")


def build_run(cfg: RunConfig, specs: list[TaskSpec], run_dir: Path, *, fresh_tokenizer: bool,
              rank: int = 0) -> tuple[TaskData, TextTokenizer, MultiTaskModel]:
    """Data, tokenizer and model for a run directory. ``fresh_tokenizer``: a new run — its
    tokenizer is trained on the run's training texts (or, with ``init:``, copied from the
    checkpoint) and saved in ``run_dir`` (under data parallelism by rank 0; the others load
    it), and with ``init:`` the model starts from the checkpoint's weights (with
    ``train.save_base: false`` rank 0 records them in ``base.json``); otherwise both come
    from ``run_dir`` later (the caller loads the weights) — except a ``train.save_base: false``
    run's base, rebuilt here from its verified ``init:`` checkpoint (:func:`verified_base`).
    The initialisation of everything not loaded depends on ``train.seed`` only."""
    if not cfg.train.save_base and cfg.init is None:
        raise ValueError("train.save_base = false saves only the trained tensors and rebuilds "
                         "the rest from the init: checkpoint, but this run has no init: "
                         "(nothing to rebuild its base from); set init: or train.save_base = true")
    data = TaskData.load(specs)
    if fresh_tokenizer and rank == 0:
        if cfg.init is None:
            tokenizer = Tokenizer.train(tokenizer_corpus(data), cfg.data.vocab_size,
                                        model_type=cfg.data.tokenizer)
            atomic_write(run_dir / "tokenizer.model", tokenizer.save, track=True)
        else:
            if not cfg.train.save_base:
                record_base(cfg.init, run_dir)
            tokenizer = init_tokenizer(cfg.init)
            if isinstance(tokenizer, Tokenizer):   # a polytask run's: its one .model file
                atomic_write(run_dir / "tokenizer.model", tokenizer.save, track=True)
            else:                                  # a pretrained one's directory
                tokenizer.save(run_dir / "tokenizer")
                record_files(run_dir, [f"tokenizer/{p.name}" for p in
                                       sorted((run_dir / "tokenizer").iterdir()) if p.is_file()])
    distributed.barrier()
    if not (fresh_tokenizer and rank == 0):
        tokenizer = load_run_tokenizer(run_dir)
    if cfg.init is None:
        model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    else:
        model_cfg = cfg.model       # the checkpoint's (experiments.config.init_model_config)
    model_cfg.check_memory(copies=len(specs), dtype=cfg.train.dtype)   # before building it
    pretrained = None
    if cfg.init is not None and (fresh_tokenizer or not cfg.train.save_base):
        init = cfg.init if fresh_tokenizer else verified_base(run_dir)
        if init_kind(init) in ("run", "pretrain"):   # its files are checked as they are read, and a lost
            if not (Path(init) / "best.safetensors").is_file():   # best is not its last weights
                verify_file(Path(init) / "best.safetensors")
            note = unverified_note(init) if rank == 0 else None
            if note:
                print(f"polytask: note: init: {note}", file=sys.stderr, flush=True)
        pretrained = init_backbone(init)
        _check_init(cfg, pretrained, tokenizer)
    seed_everything(cfg.train.seed)
    model = build_model(model_cfg, specs, cfg.sharing, pretrained=pretrained).to(
        device=cfg.train.device, dtype=getattr(torch, cfg.train.dtype))
    # held-out protocol: a held-out task must be scored through trained parameters (not in
    # a continual stage: its held-out tasks are other stages', heads fresh or carried over)
    if cfg.continual.stage is None:
        check_held_out_columns(model, data, cfg.sharing.strategy)
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
    saved: list[str] | None                # what the weight files hold (None: every tensor)
    # continual learning: the stage's hooks (experiments.continual.StageHooks) and the
    # sampler of its replayed earlier-stage rows; None in a plain run
    stage: Any = None
    replay_sampler: MixtureSampler | None = None


def _weighting_options(cfg: RunConfig, specs: list[TaskSpec], names: list[str]
                       ) -> dict[str, Any]:
    """``weighting.options``, with the task specs' ``weight`` as the static weights (an entry of
    ``weighting.options.weights`` wins). Any other method chooses the weights itself, so a task
    weight other than 1 is refused there rather than ignored."""
    options = dict(cfg.weighting.options)
    given = {s.name: s.weight for s in specs if s.name in names and s.weight != 1.0}
    if not given:
        return options
    if cfg.weighting.method != "static":
        name, weight = next(iter(given.items()))
        raise ValueError(f"tasks[{name}].weight = {weight} applies with weighting.method: static "
                         f"only; {cfg.weighting.method!r} chooses the task weights itself "
                         f"(remove the weight, or use static)")
    weights = options.get("weights") or {}
    options["weights"] = {**given, **(weights if isinstance(weights, dict) else {})}
    return options


def build_parts(cfg: RunConfig, specs: list[TaskSpec], data: TaskData, model: MultiTaskModel,
                *, rank: int = 0, world: int = 1, announce: bool = False) -> Parts:
    """PEFT and freezing applied to ``model`` (:func:`adapt`), then the objective, the weighting
    (its per-task gradients averaged across ranks under data parallelism), AdamW and its
    schedule, and the task sampler of this rank. With ``announce`` rank 0 prints the
    parameter counts, ``trainable 2,658 of 55,778 parameters (4.8%)``, on stderr (where the
    progress bar goes; stdout keeps the CLI's JSON)."""
    t = cfg.train
    adapt(model, cfg)
    if announce and rank == 0:
        print(describe_counts(parameter_counts(model)), file=sys.stderr, flush=True)
    names = data.train_tasks
    loss_options = cfg.task_loss_options(specs)   # unknown keys and options raise
    objective = MultiTaskObjective(specs, cfg.sharing, loss_options)
    reducer = {"gradient_reducer": distributed.average} if world > 1 else {}
    weighting = losses.WEIGHTINGS.build(cfg.weighting.method, names,
                                        options=_weighting_options(cfg, specs, names),
                                        where="weighting.options", **reducer)
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
        report=CollateReport(), saved=weight_names(cfg, model))

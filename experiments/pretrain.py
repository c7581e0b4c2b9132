"""Self-supervised pretraining of the encoder-decoder on raw text: one readable function.

``pretrain(cfg, run_dir)`` reads top to bottom: the corpus files -> the tokenizer (trained on
the first ``pretrain.tokenizer_documents`` training documents, with sentinel pieces, or taken
from ``init:``) -> a plain :class:`~polytask.core.model.transformer.EncoderDecoder` (no task
heads) -> loop (chunks of ``pretrain.chunk_tokens`` ids from the shuffled stream, noised by
T5's span corruption or BART's text infilling, token cross-entropy, clip, step) -> periodic
validation loss and perplexity on fixed validation batches, best weights, atomic checkpoints
-> ``summary.json``. A later ``polytask train`` starts from the directory with ``init:``.
The data side (documents, noising, validation batches, padding) is
:mod:`polytask.experiments.pretrain_data`; the config :mod:`polytask.experiments.pretrain_config`.

The building blocks are the training loop's: the run-directory lock (``claimed``), atomic
checkpoints with their manifest and ``LATEST``, ``metrics.jsonl`` events, AdamW and its
schedule, and data parallelism under ``torchrun`` (every rank reads the same stream and noises
the whole global batch with the same generator, then keeps its rows ``rank::world``;
gradients are averaged; rank 0 alone evaluates, logs and saves).

Resume (``resume=True``) restores weights, optimiser, schedule, torch's RNG, the stream's
position and the noise generator from the newest intact checkpoint, so a resumed run ends
with weights identical to an uninterrupted one.
"""
from __future__ import annotations

import math
import time
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from polytask.core.accelerate import accelerated
from polytask.core.data.batch import IGNORE_INDEX
from polytask.core.data.stream import TextStream
from polytask.core.data.tokenizer import Tokenizer
from polytask.core.model.transformer import EncoderDecoder
from polytask.core.training import distributed
from polytask.core.training.checkpoint import (find_checkpoint, holds_checkpoints,
                                               load_checkpoint, load_weights, save_checkpoint,
                                               save_weights)
from polytask.core.training.manifest import atomic_write, read_json, remove_file, write_json
from polytask.core.training.optim import lr_lambda, make_optimizer
from polytask.experiments.build import base_weight_files, load_run_tokenizer, seed_everything
from polytask.experiments.pretrain_config import RESUMABLE, PretrainConfig, read_pretrain_config
from polytask.experiments.pretrain_data import (Rows, collate_rows, corpus_size, noiser,
                                                training_documents, validation_rows)
from polytask.experiments.resume import (BEST, _flat, _log, _note, _restore_best,
                                         _rewind_metrics, _set_schedule, claimed)
from polytask.experiments.tracking import log_event, tensorboard_writer
from polytask.experiments.train import _update as update_step, setup_ranks



def pretrain(cfg: PretrainConfig, run_dir: Path, *, resume: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Pretrain one run; returns the summary written to ``run_dir/summary.json`` (``{}`` on
    ranks other than 0 under ``torchrun``)."""
    rank, world = setup_ranks(cfg.train)
    run_dir = Path(run_dir)
    done = None if resume else _finished(run_dir, cfg)
    if done is not None:
        return done
    with claimed(run_dir, rank == 0):
        summary = _pretrain(cfg, run_dir, resume, progress, rank, world)
    distributed.barrier()
    return summary


def _pretrain(cfg: PretrainConfig, run_dir: Path, resume: bool, progress: bool, rank: int,
              world: int) -> dict[str, Any]:
    t, p, lead = cfg.train, cfg.pretrain, rank == 0
    paths = p.paths()
    training_documents(paths, p.field, p.validation_every, 1)   # none: one line, before all
    ckpt = _checkpoint_to_resume(run_dir, resume, lead)
    changed = _changed_settings(run_dir, cfg) if ckpt is not None else {}
    tokenizer = _tokenizer(cfg, paths, run_dir, fresh=ckpt is None, lead=lead)
    noise = noiser(cfg, tokenizer)
    model_cfg = cfg.model if cfg.init else replace(
        cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    model_cfg.check_memory(dtype=t.dtype)
    seed_everything(t.seed)
    model = EncoderDecoder(model_cfg).to(device=t.device, dtype=getattr(torch, t.dtype))
    if cfg.init is not None and ckpt is None:
        load_weights(base_weight_files(cfg.init)[0], model)
    if lead:
        if ckpt is None:
            for name in (BEST, "model.safetensors"):   # a run killed before its 1st checkpoint
                remove_file(run_dir / name)
        write_json(run_dir / "config.json", cfg.to_dict(), track=True)
    optimizer = make_optimizer(model.named_parameters(), lr=t.lr, weight_decay=t.weight_decay,
                               betas=tuple(t.betas), device=torch.device(t.device))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup=t.warmup_steps, total=t.max_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio))
    stream = TextStream(paths, tokenizer.encode, eos_id=tokenizer.eos_id,
                        chunk_tokens=p.chunk_tokens, split="train", seed=t.seed,
                        shuffle_buffer=p.shuffle_buffer, validation_every=p.validation_every,
                        field=p.field, repeat=True)
    rng = np.random.default_rng(t.seed)   # the noise; its state is checkpointed
    valid = validation_rows(cfg, paths, tokenizer, noise) if lead else []
    parts = SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler,
                            stream=stream, rng=rng)
    state = _start_state(parts, ckpt, run_dir, lead, cfg, changed)
    chunks = iter(stream)
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not (progress and lead),
               dynamic_ncols=True)
    metrics = run_dir / "metrics.jsonl"
    model.train()
    with accelerated(model), tensorboard_writer(cfg, run_dir, lead, state["step"]) as writer:
        if t.max_steps == 0 and lead and ckpt is None:   # the initial model, evaluated, saved
            _evaluate(cfg, model, tokenizer, valid, state, run_dir, writer)
            _save(run_dir, parts, state)
        while state["step"] < t.max_steps:
            t0 = time.perf_counter()
            raw = [[next(chunks) for _ in range(t.batch_size // t.grad_accum)]
                   for _ in range(t.grad_accum)]   # the global batch, noised on every rank
            micro = [[noise(chunk, rng) for chunk in rows] for rows in raw]
            loss, n_tokens = _accumulate(cfg, model, tokenizer, micro, rank, world)
            try:
                finite = _update(parts, state, loss, world, t)
            except FloatingPointError as err:   # train.max_bad_steps in a row
                raise _non_finite(run_dir, state, str(err), lead) from None
            state["step"] += 1
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            state["tokens_seen"] += sum(len(chunk) for rows in raw for chunk in rows)
            lr = scheduler.get_last_lr()[0]
            if lead:
                log_event(writer, metrics, {"event": "train", "step": state["step"], "loss": loss,
                                            "finite": finite, "lr": lr, "step_s": seconds,
                                            "tokens_per_s": n_tokens / seconds})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / seconds:.0f}")
            bar.update(1)
            step = state["step"]
            if lead and (step % t.eval_every == 0 or step == t.max_steps):
                _evaluate(cfg, model, tokenizer, valid, state, run_dir, writer)
            if lead and (step % t.save_every == 0 or step == t.max_steps):
                _save(run_dir, parts, state)
        bar.close()
    if state["step"] > 0 and state["bad_steps"] >= state["step"]:
        raise _non_finite(run_dir, state, f"none of the {state['step']} steps had a finite "
                          "loss and gradient: nothing was trained", lead)
    return _finish(cfg, paths, tokenizer, model, state, run_dir) if lead else {}


def _non_finite(run_dir: Path, state: dict[str, Any], reason: str,
                lead: bool) -> FloatingPointError:
    """The error that ends a run without finite training, after rank 0 wrote a
    ``summary.json`` with ``"status": "non-finite"`` (as the training loop does)."""
    if lead:
        write_json(run_dir / "summary.json", {"status": "non-finite", "steps": state["step"],
                                              "bad_steps": state["bad_steps"], "reason": reason})
    return FloatingPointError(f"{reason}; {run_dir / 'summary.json'} records status non-finite")


# --- the run directory ----------------------------------------------------------------------

def _finished(run_dir: Path, cfg: PretrainConfig) -> dict[str, Any] | None:
    """The summary of a complete run of exactly ``cfg`` in ``run_dir`` (reused: pretraining is
    the slow step of a lifecycle job, run again and again), else None. Another config there is
    an error naming the first setting that differs."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    done = read_json(summary)
    old, new = _flat(read_pretrain_config(run_dir).to_dict()), _flat(cfg.to_dict())
    differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if done.get("status") != "ok" or differ:
        why = (f"{differ[0]} = {old.get(differ[0])!r} there, {new.get(differ[0])!r} here"
               if differ else f"its status is {done.get('status')!r}")
        raise ValueError(f"{run_dir} already holds another pretraining run ({why}); pretrain "
                         "into another --out")
    print(f"polytask: note: {run_dir} already holds this pretraining run, complete "
          f"({done['steps']} steps): reused", file=sys.stderr, flush=True)
    return done


def _checkpoint_to_resume(run_dir: Path, resume: bool, lead: bool) -> Path | None:
    """As the training loop's: a fresh run never mixes into another run's directory, and a
    resume without an intact checkpoint is an error, never a silent fresh start."""
    if not resume:
        if (run_dir / "summary.json").exists() or holds_checkpoints(run_dir):
            raise ValueError(f"{run_dir} already holds a run; continue it with `polytask "
                             f"pretrain --resume {run_dir}` or pretrain into another --out")
        return None
    ckpt, notes = find_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"{run_dir}: no intact checkpoint to resume from"
                         + (f": {'; '.join(notes)}" if notes else " (none was saved)"))
    if notes and lead:
        _note(f"{'; '.join(notes)}; resuming from checkpoints/{ckpt.name}")
    return ckpt


def _changed_settings(run_dir: Path, cfg: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved, new) for settings that differ from the run's ``config.json``;
    any key outside :data:`RESUMABLE` is refused."""
    old, new = _flat(read_pretrain_config(run_dir).to_dict()), _flat(cfg.to_dict())
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)}
    for key, (was, now) in changed.items():
        if key not in RESUMABLE:
            raise ValueError(f"{key} = {now!r} differs from the run's {was!r} "
                             f"({run_dir / 'config.json'}); on resume only "
                             f"{', '.join(RESUMABLE)} may change")
    return changed


def _tokenizer(cfg: PretrainConfig, paths: list[Path], run_dir: Path, *, fresh: bool,
               lead: bool) -> Tokenizer:
    """A fresh run's tokenizer (trained by rank 0 on the first training documents, or the
    ``init:`` run's), saved as ``tokenizer.model``; the other ranks and a resume load it."""
    p = cfg.pretrain
    if fresh and lead:
        if cfg.init is not None:
            tokenizer = load_run_tokenizer(Path(cfg.init))
        else:
            texts = training_documents(paths, p.field, p.validation_every, p.tokenizer_documents)
            tokenizer = Tokenizer.train(texts, cfg.data.vocab_size,
                                        model_type=cfg.data.tokenizer, sentinels=p.sentinels,
                                        split_digits=cfg.data.split_digits)
        atomic_write(run_dir / "tokenizer.model", tokenizer.save, track=True)
    distributed.barrier()
    if not (fresh and lead):
        tokenizer = load_run_tokenizer(run_dir)
    return tokenizer


def _start_state(parts: SimpleNamespace, ckpt: Path | None, run_dir: Path, lead: bool,
                 cfg: PretrainConfig, changed: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The loop's bookkeeping, fresh or restored from ``ckpt`` with everything it saved."""
    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "last": None,
                             "bad_steps": 0, "consecutive_bad": 0, "metrics_bytes": 0,
                             "tokens_seen": 0, "train_seconds": 0.0}
    metrics = run_dir / "metrics.jsonl"
    if ckpt is None:
        if lead:
            metrics.write_text("")
        seed_everything(cfg.train.seed)
        return state
    tensors, saved = load_checkpoint(ckpt, parts.model)
    where = ckpt / "state.json"
    if not isinstance(saved, dict) or not set(state) | {"stream", "noise_rng"} <= set(saved):
        raise ValueError(f"{where}: not a pretraining checkpoint's state (expected the keys "
                         f"{', '.join(sorted(set(state) | {'stream', 'noise_rng'}))})")
    if saved["step"] > cfg.train.max_steps:
        raise ValueError(f"{where}: the checkpoint is at step {saved['step']}, beyond "
                         f"train.max_steps = {cfg.train.max_steps}; resume with more steps")
    try:
        parts.optimizer.load_state_dict(tensors["optimizer"])
        parts.scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
        parts.stream.load_state_dict(saved["stream"])
        parts.rng.bit_generator.state = saved["noise_rng"]
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise ValueError(f"{ckpt}: does not fit this run's optimiser, schedule, stream or "
                         f"noise generator ({type(err).__name__}: {err})") from None
    if "train.lr" in changed or "train.max_steps" in changed:
        _set_schedule(parts, cfg.train)
    state.update({k: saved[k] for k in state})
    if lead:
        _restore_best(run_dir, ckpt, state)
        _rewind_metrics(metrics, state["metrics_bytes"], ckpt, state["step"])
        if changed:
            _log(metrics, {"event": "resume", "step": state["step"],
                           "changed": {k: new for k, (_, new) in changed.items()},
                           "previous": {k: old for k, (old, _) in changed.items()}})
    return state


# --- one step -------------------------------------------------------------------------------

def _loss_sum(cfg: PretrainConfig, model: EncoderDecoder, batch: dict[str, torch.Tensor]
              ) -> torch.Tensor:
    """Summed token cross-entropy of a batch (divided by the global label count by callers)."""
    labels = batch.pop("labels")
    device = torch.device(cfg.train.device).type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.train.bf16):
        logits = model(**batch)                                   # (b, t, V)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _accumulate(cfg: PretrainConfig, model: EncoderDecoder, tokenizer: Tokenizer,
                micro: list[Rows], rank: int, world: int) -> tuple[float, int]:
    """Backward of this rank's rows of each micro-batch, scaled so that the gradients averaged
    over ranks are those of the global batch's mean token loss. Returns that loss and the
    global batch's tokens (inputs and targets)."""
    labels = sum(len(t) + 1 for rows in micro for _, t in rows)   # every rank counts all
    n_tokens = sum(len(s) + len(t) + 1 for rows in micro for s, t in rows)
    total = 0.0
    for rows in micro:
        mine = rows[rank::world]
        if not mine:
            continue
        loss = _loss_sum(cfg, model, collate_rows(mine, tokenizer, cfg.train.device)) / labels
        (loss * world).backward()
        total += float(loss.detach())
    if world > 1:
        total = float(distributed.average(torch.tensor([total], dtype=torch.float64))) * world
    return total, n_tokens


def _update(parts: SimpleNamespace, state: dict[str, Any], loss: float, world: int, t) -> bool:
    """Average gradients, clip and step — never with non-finite values (``train.max_bad_steps``
    in a row stop the run): the training loop's update. Returns whether the step was taken."""
    parts.trainable = [p for p in parts.model.parameters() if p.requires_grad]
    finite = distributed.all_true(math.isfinite(loss))
    return update_step(parts, state, finite, world, state["step"] + 1, t)


# --- evaluation, checkpoints, summary -------------------------------------------------------

@torch.no_grad()
def validation_loss(cfg: PretrainConfig, model: EncoderDecoder, tokenizer: Tokenizer,
                    batches: list[Rows]) -> float:
    """Mean token cross-entropy over the fixed validation batches."""
    was = model.training
    model.eval()
    total = sum(float(_loss_sum(cfg, model, collate_rows(rows, tokenizer, cfg.train.device)))
                for rows in batches)
    model.train(was)
    return total / sum(len(t) + 1 for rows in batches for _, t in rows)


def _evaluate(cfg: PretrainConfig, model: EncoderDecoder, tokenizer: Tokenizer,
              batches: list[Rows], state: dict[str, Any], run_dir: Path, writer) -> None:
    loss = validation_loss(cfg, model, tokenizer, batches)
    log_event(writer, run_dir / "metrics.jsonl",
              {"event": "eval", "split": "validation", "step": state["step"], "loss": loss,
               "perplexity": math.exp(min(loss, 700.0))})
    state["last"] = loss
    if math.isfinite(loss) and (state["best"] is None or loss < state["best"]):
        state["best"], state["best_step"] = loss, state["step"]
        save_weights(run_dir / BEST, model, track=True)


def _save(run_dir: Path, parts: SimpleNamespace, state: dict[str, Any]) -> None:
    state["metrics_bytes"] = (run_dir / "metrics.jsonl").stat().st_size
    saved = {**state, "stream": parts.stream.state_dict(),
             "noise_rng": parts.rng.bit_generator.state}
    tensors = {"optimizer": parts.optimizer.state_dict(),
               "scheduler": parts.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    save_checkpoint(run_dir, state["step"], parts.model, tensors, saved, snapshot=(BEST,))


def _finish(cfg: PretrainConfig, paths: list[Path], tokenizer: Tokenizer, model: EncoderDecoder,
            state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    summary = {
        "status": "ok", "objective": cfg.pretrain.objective, "steps": state["step"],
        "tokens_seen": state["tokens_seen"], "train_seconds": state["train_seconds"],
        "best_step": state["best_step"], "best_validation_loss": state["best"],
        "final_validation_loss": state["last"], "bad_steps": state["bad_steps"],
        "corpus": {"files": [str(p) for p in paths],
                   **corpus_size(paths, cfg.pretrain.field, tokenizer)},
        "vocab_size": tokenizer.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    write_json(run_dir / "summary.json", summary)
    return summary

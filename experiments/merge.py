"""``polytask merge RUN... --method task_arithmetic|ties|dare --out RUN``: single-task fine-tunes
of one ``init:`` checkpoint merged into one hard-shared multi-task run, without joint training
(the merging itself: :mod:`polytask.core.merging`).

Sources are run directories. Each contributes every task column it has: a
``sharing.strategy: none`` run holds k single-task fine-tunes of one initialisation (one
private backbone per task), a single-task run one. A run whose columns share parameters
(``hard``, ``soft``, ``hierarchical``, cross-stitch units) holds no single-task fine-tunes and
is refused. Every source must start from the same ``init:`` (compared by the SHA-256 of its
weight files: with no common initialisation there is no task vector), have one model config
and bring tasks no other source brings. theta_0 is that checkpoint's backbone
(:func:`polytask.experiments.build.init_backbone`); theta_t is task t's column with its run's
best validation weights (LoRA folded in). A task that never runs a slot (the decoder of a
classifier task) has a zero task vector there.

The OUT directory is a run like any other (``polytask eval``, ``generate``, ``export``, the
ablation report read it): ``config.json`` (the union of the tasks, ``sharing.strategy: hard``,
the common ``init:``, ``train.max_steps: 0``), the init's tokenizer, ``model.safetensors`` and
``best.safetensors`` (the merged backbone; classifier heads copied from the source runs),
``merge.json`` (sources, digests, method, options; written first, so an unfinished merge is
recognisable and may be redone), ``metrics.jsonl`` (the validation and test evaluations) and
``summary.json``, written last by the training loop's own :func:`polytask.experiments.train.
_finish`. The directory is locked while it is written; an existing OUT is refused unless it is
an unfinished merge.

An ablation's ``merge:`` section (:func:`merge_settings`) merges each of its ``none`` runs into
rows of its own (:func:`merge_plan`; run by :mod:`polytask.experiments.ablate`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from polytask.core import merging
from polytask.core.accelerate import accelerated
from polytask.core.data.collate import CollateReport
from polytask.core.training.checkpoint import model_state, remove_leftovers, save_weights
from polytask.core.training.lock import LOCK, hold
from polytask.core.training.manifest import atomic_write, write_json
from polytask.experiments.build import _digests, build_run, init_backbone, resolve_tasks
from polytask.experiments.config import MAY_DIFFER, RunConfig
from polytask.experiments.config_files import load_yaml, parse_overrides
from polytask.experiments.evaluate import eval_options, evaluate
from polytask.experiments.resume import BEST, _prepare_run_dir, read_run_config
from polytask.experiments.runs import load_run
from polytask.experiments.tracking import log_event
from polytask.experiments.train import _finish
from polytask.heads.model import MultiTaskModel

MERGE_MANIFEST = "merge.json"
#: the keys of an ablation config's ``merge:`` section
MERGE_KEYS = ("methods", "scale", "density", "drop", "seed", "combine")
#: the ``sharing:`` keys that shape the task heads, which the merged run keeps
HEAD_OPTIONS = ("classifier_pooling", "classifier_hidden", "rank_normalize")
FUNCTIONS = {"task_arithmetic": merging.task_arithmetic, "ties": merging.ties,
             "dare": merging.dare}


@dataclass
class Source:
    """One source run: its directory, config, task names and ``init:`` digests."""
    run_dir: Path
    cfg: RunConfig
    tasks: list[str]
    digests: dict[str, str]


def resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the method's defaults filled in, checked by a merge of a one-number
    model (so a bad method, option name or value fails before any run is read)."""
    if method not in merging.METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of "
                         f"{', '.join(merging.METHODS)}")
    merging.merge(method, {"x": torch.zeros(1)}, [{"x": torch.zeros(1)}], **options)
    params = inspect.signature(FUNCTIONS[method]).parameters
    return {**{k: params[k].default for k in merging.OPTIONS[method]
               if params[k].default is not inspect.Parameter.empty}, **options}


def read_source(run_dir: Path) -> Source:
    """A source run's config, checked: it has an ``init:`` and single-task columns."""
    cfg = read_run_config(run_dir)
    if cfg.init is None:
        raise ValueError(f"{run_dir}: the run has no init: checkpoint; with no common "
                         "initialisation there is no task vector (merge runs fine-tuned from "
                         "one init:)")
    tasks = [s.name for s in resolve_tasks(cfg)]
    s = cfg.sharing
    if len(tasks) > 1 and (s.strategy != "none" or s.cross_stitch):
        what = "sharing.cross_stitch = true" if s.cross_stitch else \
            f"sharing.strategy = {s.strategy!r}"
        raise ValueError(f"{run_dir}: {what} with {len(tasks)} tasks: its task columns are not "
                         "single-task fine-tunes; merge sharing.strategy none runs (without "
                         "cross-stitch) or single-task runs")
    return Source(run_dir, cfg, tasks, _digests(cfg.init))


def _describe(digests: dict[str, str]) -> str:
    return ", ".join(f"{name} SHA-256 {d}" for name, d in sorted(digests.items()))


def check_sources(sources: list[Source]) -> None:
    """One ``init:`` (by digest), one model config, one head configuration, no task twice."""
    if not sources:
        raise ValueError("polytask merge: give at least one run directory")
    first = sources[0]
    owner: dict[str, Path] = {}
    for src in sources:
        if src.digests != first.digests:
            raise ValueError(f"{src.run_dir} and {first.run_dir} start from different init: "
                             f"checkpoints ({src.cfg.init}: {_describe(src.digests)}; "
                             f"{first.cfg.init}: {_describe(first.digests)}); task vectors "
                             "need one common initialisation")
        ours, theirs = src.cfg.model.to_dict(), first.cfg.model.to_dict()
        wrong = [k for k in ours if k not in MAY_DIFFER and ours[k] != theirs[k]]
        if wrong:
            raise ValueError(f"{src.run_dir}: model.{wrong[0]} = {ours[wrong[0]]!r} where "
                             f"{first.run_dir} has {theirs[wrong[0]]!r}; merged runs need one "
                             "model config")
        for key in HEAD_OPTIONS:
            a, b = getattr(src.cfg.sharing, key), getattr(first.cfg.sharing, key)
            if a != b:
                raise ValueError(f"{src.run_dir}: sharing.{key} = {a!r} where {first.run_dir} "
                                 f"has {b!r}; the merged run has one head configuration")
        for task in src.tasks:
            if task in owner:
                raise ValueError(f"task {task!r} is in both {owner[task]} and {src.run_dir}; "
                                 "each task may come from one run only")
            owner[task] = src.run_dir


def merged_config(sources: list[Source]) -> RunConfig:
    """The OUT run's config: the first source's, with every source's tasks, hard sharing
    (its head options kept), no PEFT or freezing, and ``train.max_steps: 0``."""
    first = sources[0].cfg
    if len(sources) == 1 and isinstance(first.tasks, str):
        tasks: Any = first.tasks                      # a built-in suite, by name
    else:
        tasks = [spec for src in sources for spec in resolve_tasks(src.cfg)]
    data = first.to_dict()
    data["tasks"] = tasks
    data["sharing"] = {"strategy": "hard",
                       **{k: getattr(first.sharing, k) for k in HEAD_OPTIONS}}
    data["train"].update(max_steps=0, peft={}, train_top_layers=None, train_only=[],
                         save_base=True, tensorboard=False)
    return RunConfig.from_dict(data, resolve_init=False)


def _column(model: MultiTaskModel, task: str, base: dict[str, torch.Tensor]
            ) -> dict[str, torch.Tensor]:
    """Task ``task``'s backbone state (tied tensors once); slots the task never runs (a
    classifier's decoder) take the base's values: a zero task vector there."""
    state = model_state(model.for_column(task))
    return {**{k: v for k, v in base.items() if k not in state}, **state}


def _check_out(out: Path) -> None:
    """Refuse an OUT that is finished, or holds anything but an unfinished merge."""
    if (out / "summary.json").exists():
        raise ValueError(f"{out} already holds a finished run; choose another --out")
    held = [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if held and not (out / MERGE_MANIFEST).is_file():
        raise ValueError(f"{out} holds files ({', '.join(sorted(held)[:3])}) but is no "
                         f"unfinished merge (no {MERGE_MANIFEST}); choose another --out")


def merge_runs(runs: list[Path], method: str, options: dict[str, Any], out: Path
               ) -> dict[str, Any]:
    """Merge the task columns of ``runs`` with ``method`` into the run directory ``out`` (see
    the module doc); returns its ``summary.json``."""
    options = resolve_options(method, dict(options))
    sources = [read_source(Path(r)) for r in runs]
    check_sources(sources)
    cfg = merged_config(sources)
    out = Path(out)
    if (out / "summary.json").exists():   # before taking the lock (which creates the dir)
        raise ValueError(f"{out} already holds a finished run; choose another --out")
    with hold(out, "polytask merge"):
        _check_out(out)
        remove_leftovers(out)
        write_json(out / MERGE_MANIFEST, {
            "method": method, "options": options, "init": cfg.init,
            "sources": [{"run": str(s.run_dir), "tasks": s.tasks, "init": s.cfg.init,
                         "sha256": s.digests} for s in sources]}, track=True)
        return _write_run(cfg, sources, method, options, out)


def _write_run(cfg: RunConfig, sources: list[Source], method: str, options: dict[str, Any],
               out: Path) -> dict[str, Any]:
    base = model_state(init_backbone(cfg.init))
    tuned, heads = [], {}
    for src in sources:
        _, _, _, model = load_run(src.run_dir, weights="best")
        tuned += [_column(model, t, base) for t in src.tasks]
        heads.update({t: model.head(t).state_dict() for t in src.tasks})
    merged = merging.merge(method, base, tuned, **options)
    data, tokenizer, model = build_run(cfg, resolve_tasks(cfg), out, fresh_tokenizer=True)
    _prepare_run_dir(out, cfg, fresh=True, adopt=False)
    column = model.for_column(model.tasks[0].name)    # hard sharing: every task's backbone
    missing = [k for k in model_state(column) if k not in merged]
    if missing:
        raise ValueError(f"{out}: the merged state lacks {', '.join(missing[:3])}")
    column.load_state_dict({k: v for k, v in merged.items() if k in column.state_dict()},
                           strict=False)
    for task, state in heads.items():
        model.head(task).load_state_dict(state)
    atomic_write(out / "metrics.jsonl", lambda p: Path(p).write_text(""))
    model.eval()
    with accelerated(model):
        state = {"step": 0, "best_step": None, "best": None, "bad_steps": 0}
        if any("validation" in data.examples[t] for t in data.specs):
            scores = evaluate(model, data, tokenizer, "validation",
                              **eval_options(cfg, "validation"))
            log_event(None, out / "metrics.jsonl",
                      {"event": "eval", "split": "validation", "step": 0, **scores})
            state.update(best_step=0, best=scores.get(cfg.train.early_stopping_metric))
        save_weights(out / BEST, model, track=True)
        save_weights(out / "model.safetensors", model, track=True)
        # the training loop's own ending: best weights reloaded, test, predictions, summary
        parts = SimpleNamespace(report=CollateReport(), saved=None)
        return _finish(cfg, model, data, tokenizer, state, out, parts)


def merge_settings(path: str | Path, overrides: list[str] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """``merge:`` of an ablation config (with ``merge.KEY=value`` overrides) as
    ``{method: its resolved options}`` (each method gets the options it takes); ``{}`` without
    one. Checked before anything runs: unknown keys, methods and values name ``merge.<key>``."""
    section = load_yaml(path).get("merge") or {}
    for key, value in parse_overrides(overrides or []).items():
        if key.startswith("merge."):
            section = {**section, key[len("merge."):]: value}
    if not section:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: merge must be a mapping ({', '.join(MERGE_KEYS)}), got "
                         f"{section!r}")
    unknown = [k for k in section if k not in MERGE_KEYS]
    if unknown:
        raise ValueError(f"{path}: merge.{unknown[0]} is not a merge option; known: "
                         f"{', '.join(MERGE_KEYS)}")
    methods = section.get("methods")
    if not isinstance(methods, list) or not methods or \
            any(m not in merging.METHODS for m in methods):
        raise ValueError(f"{path}: merge.methods = {methods!r}; give a non-empty list of "
                         f"{', '.join(merging.METHODS)}")
    out = {}
    for method in methods:
        options = {k: v for k, v in section.items() if k in merging.OPTIONS[method]}
        try:
            out[method] = resolve_options(method, options)
        except ValueError as err:
            raise ValueError(f"{path}: merge ({method}): {err}") from None
    return out


def merge_plan(runs: list[tuple[str, dict, int, RunConfig]], methods: dict[str, dict],
               run_name: Callable[[dict, int], str]
               ) -> list[tuple[str, dict, int, RunConfig, str, str]]:
    """An ablation's merged runs, (name, combo, seed, config, source run name, method): every
    run with ``sharing.strategy: none`` by every method, named by the ablation's ``run_name``
    with the strategy ``merged-METHOD`` and labelled ``merged (METHOD)``; refused up front
    when there is none or one has no ``init:`` (the common initialisation of its task
    vectors)."""
    merged: list[tuple[str, dict, int, RunConfig, str, str]] = []
    for name, combo, seed, cfg in runs if methods else []:
        if cfg.sharing.strategy != "none":
            continue
        if cfg.init is None:
            raise ValueError(f"run {name}: merge: needs init: (the common initialisation of "
                             "the task vectors); set init: or drop merge:")
        for method in methods:
            label = {**combo, "sharing.strategy": f"merged ({method})"}
            merged_name = run_name({**combo, "sharing.strategy": f"merged-{method}"}, seed)
            merged.append((merged_name, label, seed, cfg, name, method))
    if methods and not merged:
        raise ValueError("merge: merges the runs with sharing.strategy none, but the ablation "
                         "has none; add none to grid.sharing.strategy or drop merge:")
    return merged


def command(args: Any) -> dict[str, Any]:
    """``polytask merge``: the options given on the command line, merged into ``args.out``;
    returns what the CLI prints (the run directory and its test scores)."""
    given = {k: getattr(args, k) for k in ("scale", "density", "drop", "seed", "combine")
             if getattr(args, k, None) is not None}
    summary = merge_runs([Path(r) for r in args.runs], args.method, given, Path(args.out))
    return {"run_dir": str(args.out), "test": summary["test"]}

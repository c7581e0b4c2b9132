"""The ``polytask`` command line.

    polytask train CONFIG [key=value ...] [--out RUN_DIR]
    polytask train --resume RUN_DIR [key=value ...]   (keys that may change on resume)
    polytask pretrain CONFIG [key=value ...] [--out RUN_DIR]   (self-supervised, on raw text)
    polytask pretrain --resume RUN_DIR [key=value ...]
    polytask eval RUN_DIR [--split test] [--weights best|last]
    polytask generate RUN_DIR --task T (--input TEXT | --input-file X.jsonl [--output Y.jsonl])
                      [--instruction I] [--method greedy|beam|sample ...] [--scores]
                      [--weights best|last]
    polytask ablate CONFIG [key=value ...] [--out DIR] [--jobs N]
    polytask bench [what ...]
    polytask export RUN_DIR --onnx OUT_DIR [--weights best|last]
    polytask compare DIR... [--out FILE.md|FILE.csv]   (ablation and run directories)

``eval``, ``generate`` and ``export`` load the run's best validation weights
(``best.safetensors``, the ones ``summary.json`` scores) unless ``--weights last``; a run that
never validated has none and uses ``model.safetensors``, with a note on stderr. ``generate``
predicts on evaluation's input path (:func:`polytask.experiments.runs.predict_records`).

One error boundary (:func:`main`): a user error (bad config key or value, a missing, damaged or
unwritable file, unknown task, a full disk ...) exits with status 2 and one line
``polytask: error: <file or key>: <problem>``; Ctrl-C exits with 130; anything else is a bug,
reported in one line (status 1) with its traceback written to a file. ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from polytask.experiments.errors import (ANTICIPATED, crash_report, error_message, one_line,
                                         stdout_gone)


class UsageError(ValueError):
    """A bad command line: reported in one line like every other user error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit itself
        raise UsageError(f"{self.prog}: {message}")


def _weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="best", choices=["best", "last"],
                   help="best validation weights, which summary.json scores (default; a run "
                   "that never validated falls back to last), or the final step's")


def _weights(args: argparse.Namespace) -> str:
    """``args.weights``, after telling stderr when the run lacks that file."""
    from polytask.experiments.runs import final_stage, weights_note
    args.run_dir = str(final_stage(Path(args.run_dir)))   # a continual run: its last stage
    note = weights_note(Path(args.run_dir), args.weights)
    if note:
        print(f"polytask: note: {note}", file=sys.stderr)
    return args.weights


def _parser() -> argparse.ArgumentParser:
    from polytask.core.data.task_data import SPLITS
    p = _Parser(prog="polytask", description="multi-task Transformer research framework")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one run")
    t.add_argument("config", nargs="?", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest intact checkpoint; key=value overrides "
                   "may then change train.lr, train.max_steps and the other settings that "
                   "leave its saved state meaningful (the others are refused, listing these)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, file, overrides) as YAML and exit")

    pt = sub.add_parser("pretrain", help="pretrain the encoder-decoder on raw text (T5 span "
                        "corruption or BART text infilling); `init: RUN_DIR` starts from it")
    pt.add_argument("config", nargs="?", help="YAML pretraining config")
    pt.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    pt.add_argument("--out", help="run directory (default runs/<config name>)")
    pt.add_argument("--resume", metavar="RUN_DIR",
                    help="continue a pretraining run from its newest intact checkpoint")
    pt.add_argument("--no-progress", action="store_true")
    pt.add_argument("--print-config", action="store_true",
                    help="print the resolved config as YAML and exit")

    e = sub.add_parser("eval", help="evaluate a finished or interrupted run")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=SPLITS)
    _weights_option(e)

    g = sub.add_parser("generate", help="predict with a trained run, as evaluation does")
    g.add_argument("run_dir")
    g.add_argument("--task", required=True)
    given = g.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", help="one input text")
    given.add_argument("--input-file", metavar="X.jsonl",
                       help="records with 'input' and optional 'instruction', one a line")
    g.add_argument("--output", metavar="Y.jsonl",
                   help="with --input-file: write predictions here (default stdout)")
    g.add_argument("--instruction", help="for a task without templates (default: the one its "
                   "records share); records of --input-file may carry their own")
    g.add_argument("--method", default="greedy", help="greedy (default), beam or sample")
    g.add_argument("--num-beams", type=int, help="beam: beams (default 4)")
    g.add_argument("--length-penalty", type=float, help="beam: GNMT alpha (default 1.0)")
    g.add_argument("--temperature", type=float, help="sample (default 1.0)")
    g.add_argument("--top-k", type=int, help="sample (default 0: off)")
    g.add_argument("--top-p", type=float, help="sample (default 1.0: off)")
    g.add_argument("--seed", type=int, help="sample: fixed seed (default: a fresh one)")
    g.add_argument("--num-sequences", type=int, default=1, help="sample: samples per input")
    g.add_argument("--max-new-tokens", type=int,
                   help="default: the run's train.generation_max_tokens")
    g.add_argument("--scores", action="store_true",
                   help="classification tasks: print every label's score")
    _weights_option(g)

    a = sub.add_parser("ablate", help="run an ablation grid and write table and plots")
    a.add_argument("config")
    a.add_argument("overrides", nargs="*")
    a.add_argument("--out", help="output directory (default runs/<config name>)")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (default 1)")
    a.add_argument("--threads", type=int, default=None,
                   help="torch threads per run with --jobs (default: cores / jobs)")
    a.add_argument("--print-config", action="store_true",
                   help="print the resolved base config, grid and seeds as YAML and exit")

    b = sub.add_parser("bench", add_help=False, help="benchmarks (see experiments/bench)")
    b.add_argument("-h", "--help", action="store_true", help="list the benchmarks")
    b.add_argument("rest", nargs=argparse.REMAINDER)

    x = sub.add_parser("export", help="export a run's model")
    x.add_argument("run_dir")
    x.add_argument("--onnx", required=True, metavar="OUT_DIR")
    _weights_option(x)

    c = sub.add_parser("compare", help="one table of test scores from ablation and run "
                       "directories")
    c.add_argument("dirs", nargs="+", metavar="DIR",
                   help="ablation directories (runs/*/summary.json) and run directories")
    c.add_argument("--out", metavar="FILE.md|FILE.csv", help="also write the table there")

    m = sub.add_parser("merge", help="merge single-task fine-tunes of one init: into one run "
                       "(experiments/merge.py)")
    m.add_argument("runs", nargs="+", metavar="RUN", help="run directories (sharing none, or "
                   "single-task), all from one init: checkpoint")
    m.add_argument("--method", required=True, choices=["task_arithmetic", "ties", "dare"])
    m.add_argument("--scale", type=float, help="lambda: theta_0 + scale * merged task vector")
    m.add_argument("--density", type=float, help="ties (and dare --combine ties): fraction kept")
    m.add_argument("--drop", type=float, help="dare: drop probability")
    m.add_argument("--seed", type=int, help="dare: seed of the drop masks")
    m.add_argument("--combine", choices=["sum", "ties"], help="dare: how to combine (sum)")
    m.add_argument("--out", required=True, metavar="RUN_DIR")
    return p


def _config_and_run_dir(args: argparse.Namespace, load, resume_load) -> tuple[Any, Path]:
    """``train`` and ``pretrain``: CONFIG with overrides and the run directory (``--out``, else
    runs/<config name>), or with ``--resume RUN_DIR`` that run's saved config with overrides."""
    if args.resume:
        # argparse puts a first key=value into CONFIG: with --resume every positional is one
        given = ([args.config] if args.config else []) + list(args.overrides)
        if any("=" not in item for item in given):
            raise UsageError(f"polytask {args.command}: give either CONFIG or --resume RUN_DIR, "
                             "not both")
        return resume_load(Path(args.resume), given), Path(args.resume)
    if not args.config:
        raise UsageError(f"polytask {args.command}: CONFIG is required (or --resume RUN_DIR)")
    return (load(args.config, args.overrides),
            Path(args.out or Path("runs") / Path(args.config).stem))


def _cmd_train(args: argparse.Namespace) -> None:
    from polytask.experiments.config import load_config
    from polytask.experiments.runs import train_run
    from polytask.experiments.resume import resume_config

    cfg, run_dir = _config_and_run_dir(args, load_config, resume_config)
    if args.print_config:
        return _print_config(cfg.to_dict())
    summary = train_run(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if summary:  # under torchrun only rank 0 evaluates and reports
        print(json.dumps({"run_dir": str(run_dir), "test": summary["test"]}, indent=2))


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from polytask.experiments.pretrain import pretrain
    from polytask.experiments.pretrain_config import (load_pretrain_config,
                                                      resume_pretrain_config)
    cfg, run_dir = _config_and_run_dir(args, load_pretrain_config, resume_pretrain_config)
    if args.print_config:
        return _print_config(cfg.to_dict())
    summary = pretrain(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if summary:  # under torchrun only rank 0 reports
        print(json.dumps({"run_dir": str(run_dir), **{k: summary[k] for k in (
            "steps", "best_validation_loss", "final_validation_loss")}}, indent=2))


def _cmd_eval(args: argparse.Namespace) -> None:
    from polytask.experiments.runs import evaluate_run
    print(json.dumps(evaluate_run(Path(args.run_dir), split=args.split,
                                  weights=_weights(args)), indent=2))


def _cmd_generate(args: argparse.Namespace) -> None:
    from polytask.experiments.runs import Decoding, load_run, predict_records
    if args.output and not args.input_file:
        raise UsageError("polytask generate: --output needs --input-file")
    if args.output and (Path(args.output).is_dir() or not Path(args.output).parent.is_dir()):
        raise UsageError(f"polytask generate: --output {args.output}: "  # before predicting
                         + ("is a directory" if Path(args.output).is_dir()
                            else "its directory does not exist"))
    decoding = Decoding(args.method, args.num_beams, args.length_penalty, args.temperature,
                        args.top_k, args.top_p, args.seed, args.num_sequences,
                        args.max_new_tokens, args.scores)
    records = _input_records(args)
    run = load_run(Path(args.run_dir), weights=_weights(args))
    out = predict_records(*run, args.task, records, decoding)
    if args.input_file:
        lines = "".join(json.dumps(r) + "\n" for r in out)
        if args.output:
            _write_text(Path(args.output), lines)
        else:
            print(lines, end="")
    elif args.scores:
        print(json.dumps({"prediction": out[0]["prediction"], "scores": out[0]["scores"]}))
    else:
        print("\n".join(out[0].get("predictions", [out[0].get("prediction")])))


def _write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, with the path on an OSError that the write or the close
    raises without one (a full disk: ``open`` names the file, ``write`` does not)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


def _input_records(args: argparse.Namespace) -> list[dict]:
    """``--input`` (with ``--instruction``) as one record, or the records of ``--input-file``
    (``--instruction`` fills those that have none)."""
    from polytask.core.data.task_data import read_records
    extra = {} if args.instruction is None else {"instruction": args.instruction}
    if args.input is not None:
        return [{"input": args.input, **extra}]
    path = Path(args.input_file)
    if path.suffix != ".jsonl":
        raise ValueError(f"--input-file {path}: expected a .jsonl file")
    records = [{**extra, **r} for _, r in read_records(path)]
    if not records:
        raise ValueError(f"--input-file {path}: no records")
    return records


def _print_config(resolved: dict) -> None:
    """``--print-config``: the config as YAML on stdout; nothing is run or written."""
    import yaml
    print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), end="")


def _ablation_config(args: argparse.Namespace) -> dict:
    """The resolved base config plus the grid and seeds every run of ``plan`` was built from
    (``plan`` validates each run's config first)."""
    from polytask.experiments.ablate import plan
    from polytask.experiments.config import load_config
    runs = plan(args.config, args.overrides)
    base = [o for o in args.overrides if not o.startswith(("grid.", "seeds="))]
    grid: dict = {}
    for _, combo, _, _ in runs:
        for key, value in combo.items():
            if value not in grid.setdefault(key, []):
                grid[key].append(value)
    seeds = list(dict.fromkeys(seed for _, _, seed, _ in runs))
    return {**load_config(args.config, base).to_dict(), "grid": grid, "seeds": seeds}


def _cmd_ablate(args: argparse.Namespace) -> None:
    from polytask.experiments.ablate import ablate
    if args.print_config:
        return _print_config(_ablation_config(args))
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    paths = ablate(args.config, out, args.overrides, progress=not args.no_progress,
                   jobs=args.jobs, threads=args.threads)
    print(paths["table"].read_text())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


def _cmd_bench(args: argparse.Namespace) -> None:
    from polytask.experiments.bench import main as bench_main
    bench_main((["--help"] if args.help else []) + args.rest)


def _cmd_compare(args: argparse.Namespace) -> None:
    from polytask.experiments.compare import compare
    print(compare(args.dirs, args.out), end="")


def _cmd_export(args: argparse.Namespace) -> None:
    from polytask.experiments.runs import export_run
    for path in export_run(Path(args.run_dir), Path(args.onnx), weights=_weights(args)):
        print(path)


def _cmd_merge(args: argparse.Namespace) -> None:
    from polytask.experiments.merge import command
    print(json.dumps(command(args), indent=2))


COMMANDS = {"train": _cmd_train, "pretrain": _cmd_pretrain, "eval": _cmd_eval,
            "generate": _cmd_generate,
            "ablate": _cmd_ablate, "bench": _cmd_bench, "export": _cmd_export,
            "compare": _cmd_compare, "merge": _cmd_merge}


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status. The error boundary: an anticipated failure
    (:data:`ANTICIPATED`) prints ``polytask: error: <file or key>: <problem>`` (status 2), an
    interrupt ``polytask: interrupted`` (130), anything else a one-line crash report whose
    traceback goes to a file (1). ``--debug``, anywhere on the line, raises instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    args = None
    try:
        args = _parser().parse_args(argv)
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("polytask: interrupted", file=sys.stderr)
        return 130
    except ANTICIPATED as e:
        if isinstance(e, BrokenPipeError) and stdout_gone():
            return 141  # `polytask generate ... | head`: the reader left, as SIGPIPE reports it
        if debug:
            raise
        print(f"polytask: error: {error_message(e, args)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"polytask: internal error: {type(e).__name__}: {one_line(str(e))} (this is a "
              f"bug; the traceback is in {crash_report(e)}; --debug prints it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``polytask`` command line.

    polytask train CONFIG [key=value ...] [--out RUN_DIR]
    polytask train --resume RUN_DIR
    polytask eval RUN_DIR [--split test] [--weights best|last]
    polytask generate RUN_DIR --task T (--input TEXT | --input-file X.jsonl [--output Y.jsonl])
                      [--instruction I] [--method greedy|beam|sample ...] [--scores]
                      [--weights best|last]
    polytask ablate CONFIG [key=value ...] [--out DIR] [--jobs N]
    polytask bench [what ...]
    polytask export RUN_DIR --onnx OUT_DIR [--weights best|last]

``eval``, ``generate`` and ``export`` load the run's best validation weights
(``best.safetensors``, the ones ``summary.json`` scores) unless ``--weights last``; a run that
never validated has none and uses ``model.safetensors``, with a note on stderr. ``generate``
predicts on evaluation's input path (:func:`polytask.experiments.runs.predict_records`).

A user error (bad config key or value, missing file, unknown task ...) exits with status 2 and
one line naming the problem; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    from polytask.experiments.runs import weights_note
    note = weights_note(Path(args.run_dir), args.weights)
    if note:
        print(f"polytask: note: {note}", file=sys.stderr)
    return args.weights


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="polytask", description="multi-task Transformer research framework")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one run")
    t.add_argument("config", nargs="?", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="evaluate a finished or interrupted run")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test")
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

    b = sub.add_parser("bench", help="benchmarks (see experiments/bench)")
    b.add_argument("rest", nargs=argparse.REMAINDER)

    x = sub.add_parser("export", help="export a run's model")
    x.add_argument("run_dir")
    x.add_argument("--onnx", required=True, metavar="OUT_DIR")
    _weights_option(x)
    return p


def _cmd_train(args: argparse.Namespace) -> None:
    from polytask.experiments.config import RunConfig, load_config
    from polytask.experiments.runs import train_run
    from polytask.core.training.checkpoint import read_json

    if args.resume:
        if args.config:
            raise UsageError("polytask train: give either CONFIG or --resume RUN_DIR, not both")
        run_dir = Path(args.resume)
        cfg = RunConfig.from_dict(read_json(run_dir / "config.json"), resolve_init=False)
        summary = train_run(cfg, run_dir, resume=True, progress=not args.no_progress)
    else:
        if not args.config:
            raise UsageError("polytask train: CONFIG is required (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
        summary = train_run(cfg, run_dir, progress=not args.no_progress)
    if summary:  # under torchrun only rank 0 evaluates and reports
        print(json.dumps({"run_dir": str(run_dir), "test": summary["test"]}, indent=2))


def _cmd_eval(args: argparse.Namespace) -> None:
    from polytask.experiments.runs import evaluate_run
    print(json.dumps(evaluate_run(Path(args.run_dir), split=args.split,
                                  weights=_weights(args)), indent=2))


def _cmd_generate(args: argparse.Namespace) -> None:
    from polytask.experiments.runs import Decoding, load_run, predict_records
    if args.output and not args.input_file:
        raise UsageError("polytask generate: --output needs --input-file")
    decoding = Decoding(args.method, args.num_beams, args.length_penalty, args.temperature,
                        args.top_k, args.top_p, args.seed, args.num_sequences,
                        args.max_new_tokens, args.scores)
    records = _input_records(args)
    run = load_run(Path(args.run_dir), weights=_weights(args))
    out = predict_records(*run, args.task, records, decoding)
    if args.input_file:
        lines = "".join(json.dumps(r) + "\n" for r in out)
        if args.output:
            Path(args.output).write_text(lines)
        else:
            print(lines, end="")
    elif args.scores:
        print(json.dumps({"prediction": out[0]["prediction"], "scores": out[0]["scores"]}))
    else:
        print("\n".join(out[0].get("predictions", [out[0].get("prediction")])))


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


def _cmd_ablate(args: argparse.Namespace) -> None:
    from polytask.experiments.ablate import ablate
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    paths = ablate(args.config, out, args.overrides, progress=not args.no_progress,
                   jobs=args.jobs, threads=args.threads)
    print(paths["table"].read_text())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


def _cmd_bench(args: argparse.Namespace) -> None:
    from polytask.experiments.bench import main as bench_main
    bench_main(args.rest)


def _cmd_export(args: argparse.Namespace) -> None:
    from polytask.experiments.runs import export_run
    for path in export_run(Path(args.run_dir), Path(args.onnx), weights=_weights(args)):
        print(path)


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate,
            "ablate": _cmd_ablate, "bench": _cmd_bench, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    try:
        args = _parser().parse_args(argv)
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"polytask: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TensorBoard logging (experiments.tracking) and per-example test predictions
(predictions.jsonl, experiments.evaluate): both read back and checked against what the run
itself recorded (metrics.jsonl, summary.json)."""
import json
import shutil
import sys
from pathlib import Path

import pytest

from polytask.core.training.checkpoint import LATEST
from polytask.core.training.manifest import IntegrityError, read_manifest, verify_file
from polytask.experiments.config import load_config
from polytask.experiments.evaluate import PREDICTIONS, example_scores
from polytask.experiments.runs import train_run
from polytask.experiments.tracking import TENSORBOARD_DIR, open_writer

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
FAST = ["train.max_steps=6", "train.eval_every=3", "train.save_every=3", "data.eval_examples=4",
        "data.test_examples=6", "train.batch_size=8", "model.d_model=32", "model.d_ff=64",
        "train.generation_max_tokens=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run with TensorBoard on and every template scored at the test."""
    run_dir = tmp_path_factory.mktemp("tracking") / "run"
    cfg = load_config(TINY, FAST + ["train.tensorboard=true", "data.eval_templates=all"])
    summary = train_run(cfg, run_dir, progress=False)
    return run_dir, summary


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as metrics.jsonl has them: every numeric field of the
    train events under train/, eval metrics under their split, the conflict fraction."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "train":
            fields = {f"train/{k}": v for k, v in rec.items() if k not in ("event", "step")}
        elif rec["event"] == "eval":
            fields = {f"{rec['split']}/{k}": v for k, v in rec.items()
                      if k not in ("event", "step", "split")}
        elif rec["event"] == "gradients":
            fields = {"gradients/conflict_fraction": rec["conflict_fraction"]}
        else:
            continue
        for tag, value in fields.items():
            out.setdefault(tag, []).append((rec["step"], float(value)))
    return out


def _accumulated(run_dir: Path):
    acc = event_accumulator.EventAccumulator(str(run_dir / TENSORBOARD_DIR),
                                             size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _assert_scalars_match(run_dir: Path) -> None:
    acc = _accumulated(run_dir)
    expected = _expected(run_dir)
    assert set(expected) <= set(acc.Tags()["scalars"])
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_scalars_equal_metrics_jsonl(run):
    run_dir, _ = run
    expected = _expected(run_dir)
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "train/loss/copy",
                "train/weight/parity", "validation/average_seen", "test/average_seen",
                "test/copy", "gradients/conflict_fraction"):
        assert tag in expected, tag   # the run logged what the test compares
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 7))
    _assert_scalars_match(run_dir)


def test_tensorboard_holds_the_config_at_step_0(run):
    run_dir, _ = run
    acc = _accumulated(run_dir)
    tags = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    assert tags, acc.Tags()["tensors"]
    events = acc.Tensors(tags[0])
    assert [e.step for e in events] == [0]
    text = events[0].tensor_proto.string_val[0].decode()
    config = json.loads((run_dir / "config.json").read_text())
    assert json.loads("\n".join(line[4:] for line in text.splitlines())) == config


def test_resumed_run_appends_without_duplicate_steps(tmp_path):
    cfg = load_config(TINY, FAST + ["train.tensorboard=true"])
    full = tmp_path / "full"
    train_run(cfg, full, progress=False)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / LATEST).write_text("step-00000003")   # as if killed after step 3
    (part / "summary.json").unlink()
    train_run(cfg, part, resume=True, progress=False)
    assert len(list((part / TENSORBOARD_DIR).iterdir())) == 2   # appended, not replaced
    _assert_scalars_match(part)
    steps = [e.step for e in _accumulated(part).Scalars("train/loss")]
    assert steps == list(range(1, 7))


def test_tensorboard_off_writes_nothing(tmp_path):
    cfg = load_config(TINY, FAST + ["train.max_steps=0"])
    train_run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert open_writer(load_config(TINY, ["train.tensorboard=true"]), tmp_path / "r1",
                       False, 0) is None   # only rank 0 writes
    assert not (tmp_path / "r1").exists()


def test_missing_tensorboard_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    cfg = load_config(TINY, ["train.tensorboard=true"])
    with pytest.raises(ValueError, match=r"pip install 'polytask\[tensorboard\]'") as err:
        open_writer(cfg, tmp_path, True, 0)
    assert "\n" not in str(err.value) and "train.tensorboard" in str(err.value)


def test_predictions_one_line_per_test_example_and_template(run):
    run_dir, summary = run
    lines = (run_dir / PREDICTIONS).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    counts = {}
    for r in records:
        assert set(r) == {"task", "template", "source", "reference", "prediction", "metric",
                          "score"}
        counts[(r["task"], r["template"])] = counts.get((r["task"], r["template"]), 0) + 1
    # every template of every task (data.eval_templates=all), each over every scored example
    expected = {(t, i): n for t, n in summary["examples"]["test"].items()
                for i in range(len(summary["templates"][t]["per_template"]))}
    assert counts == expected
    assert all(n == 6 for n in counts.values())


def test_prediction_scores_average_to_the_summary(run):
    run_dir, summary = run
    records = [json.loads(line) for line in (run_dir / PREDICTIONS).read_text().splitlines()]
    for task, metric in summary["metrics"].items():
        assert metric in ("accuracy", "exact_match")
        for i, value in enumerate(summary["templates"][task]["per_template"]):
            scores = [r["score"] for r in records if r["task"] == task and r["template"] == i]
            assert set(scores) <= {0.0, 100.0}
            assert sum(scores) / len(scores) == pytest.approx(value, abs=1e-9), (task, i)
            if i == 0:
                assert sum(scores) / len(scores) == pytest.approx(summary["test"][task])


def test_predictions_are_recorded_in_the_manifest(run, tmp_path):
    run_dir, _ = run
    assert PREDICTIONS in read_manifest(run_dir)
    assert verify_file(run_dir / PREDICTIONS)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with open(copy / PREDICTIONS, "a") as f:
        f.write("{}\n")
    with pytest.raises(IntegrityError, match=PREDICTIONS):
        verify_file(copy / PREDICTIONS)


def test_example_scores_per_metric():
    preds, refs = ["a b", "c", " a  b "], ["a b", "d", "a b"]
    assert example_scores("accuracy", preds, refs) == [100.0, 0.0, 0.0]
    assert example_scores("exact_match", preds, refs) == [100.0, 0.0, 100.0]
    for corpus_level in ("macro_f1", "bleu", "chrf"):
        assert example_scores(corpus_level, preds, refs) == [None, None, None]


def test_rouge_l_example_scores_average_to_the_corpus_value():
    pytest.importorskip("rouge_score")
    from polytask.core.metrics import rouge_l
    preds, refs = ["the cat sat", "a dog", "x y z"], ["the cat sat down", "a dog ran", "q"]
    scores = example_scores("rouge_l", preds, refs)
    assert 0 < scores[1] < 100 and scores[2] == 0
    assert sum(scores) / 3 == pytest.approx(rouge_l(preds, refs))

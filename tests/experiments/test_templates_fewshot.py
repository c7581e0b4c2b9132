"""Instruction-tuning evaluation as FLAN/T0 do it: the final test scored across templates
(mean/min/max, the main score the first template's) and with k training demonstrations
(deterministic, never the scored example, fitted to the source length budget)."""
from dataclasses import replace
from pathlib import Path
from statistics import mean

import pytest

from polytask.core.data.task_data import Example, TaskData, format_source
from polytask.core.data.tasks import TaskSpec
from polytask.experiments import report
from polytask.experiments.config import DataConfig, load_config
from polytask.experiments.evaluate import (demonstration_indices, eval_examples, templated,
                                           template_count)
from polytask.experiments.runs import evaluate_run, load_run, train_run
from polytask.experiments.table import markdown_table

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
FAST = ["train.max_steps=4", "train.eval_every=2", "train.save_every=4", "data.eval_examples=5",
        "data.test_examples=6", "train.batch_size=8", "model.d_model=32", "model.d_ff=64",
        "model.n_encoder_layers=1", "model.n_decoder_layers=1", "train.generation_max_tokens=4"]
SHOTS = 2


class Words:
    """A whitespace tokenizer: one token per word, so length budgets are countable."""

    def encode_source(self, text: str) -> list[str]:
        return text.split()


def _record(task: str, input: str, output: str) -> Example:
    meta = {"instruction": "Say it.", "input": input}
    return Example(task, format_source("Say it.", input), output, None, meta)


def _data(train: list[str], test: list[str], validation: list[str] = ()) -> TaskData:
    """One generation task ``echo`` with two templates; each input is its own output."""
    spec = TaskSpec("echo", templates=["First {input}", "Second {input}"])
    splits = {"train": train, "validation": list(validation), "test": test}
    examples = {sp: [_record("echo", x, x) for x in xs] for sp, xs in splits.items()}
    return TaskData({"echo": spec}, {"echo": examples})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs trained identically: every template zero-shot, and first template 2-shot."""
    tmp = tmp_path_factory.mktemp("fewshot")
    every = train_run(load_config(TINY, FAST + ["data.eval_templates=all"]), tmp / "all",
                      progress=False)
    shots = train_run(load_config(TINY, FAST + [f"data.eval_shots={SHOTS}"]), tmp / "shots",
                      progress=False)
    return tmp, every, shots


def test_every_template_is_scored_and_summarised(runs):
    _, every, _ = runs
    assert every["eval_templates"] == "all"
    for task in ("copy", "reverse", "parity"):
        t = every["templates"][task]
        assert len(t["per_template"]) == 3          # the tiny tasks each declare three
        assert t["per_template"][0] == every["test"][task]   # the main score: first template
        assert t["mean"] == pytest.approx(mean(t["per_template"]))
        assert (t["min"], t["max"]) == (min(t["per_template"]), max(t["per_template"]))


def test_first_template_mode_scores_one_template(runs):
    _, _, shots = runs
    assert shots["eval_templates"] == "first"
    assert all(len(t["per_template"]) == 1 for t in shots["templates"].values())


def test_few_shot_leaves_training_and_selection_zero_shot(runs):
    tmp, every, shots = runs
    assert (every["best_step"], every["best_validation"]) == (shots["best_step"],
                                                               shots["best_validation"])
    assert every["shots"] == 0 and set(every["demonstrations"].values()) == {0.0}
    assert shots["shots"] == SHOTS


def test_summary_records_the_demonstrations_used(runs):
    tmp, _, shots = runs
    cfg, data, tokenizer, _ = load_run(tmp / "shots")
    for task, used in shots["demonstrations"].items():
        _, counts = eval_examples(data, tokenizer, task, "test", limit=cfg.data.test_examples,
                                  max_source_len=cfg.data.max_source_len, shots=SHOTS,
                                  seed=cfg.train.seed)
        assert used == mean(counts) and 0 <= used <= SHOTS
    assert shots["demonstrations"]["copy"] > 0   # short inputs: some fit max_source_len 64


def test_polytask_eval_scores_the_test_as_the_run_did(runs):
    tmp, _, shots = runs
    assert evaluate_run(tmp / "shots") == shots["test"]


def test_zero_shots_render_exactly_the_previous_inputs(runs):
    """eval_shots = 0 and template 0: the sources ``TaskData.get`` gave before, unchanged."""
    tmp, _, _ = runs
    cfg, data, tokenizer, _ = load_run(tmp / "all")
    for task in data.specs:
        examples, used = eval_examples(data, tokenizer, task, "test", limit=None,
                                       max_source_len=cfg.data.max_source_len)
        assert examples == [data.get(task, "test", i) for i in range(len(examples))]
        assert set(used) == {0}


def test_demonstrations_are_deterministic_per_seed():
    data = _data([f"t{i}" for i in range(30)], [f"s{i}" for i in range(10)])
    draw = lambda seed: [demonstration_indices(data, "echo", "test", i, 4, seed) for i in range(10)]
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert all(len(set(d)) == 4 for d in draw(0))   # four distinct training examples


def test_demonstrations_never_hold_the_scored_example():
    # the scored input also fills most of the train split: only the three others may be drawn
    data = _data(["same"] * 20 + ["a", "b", "c"], ["same"])
    picked = demonstration_indices(data, "echo", "test", 0, 3, seed=0)
    assert sorted(picked) == [20, 21, 22]
    # scoring the train split itself never draws the scored index
    data = _data([f"t{i}" for i in range(5)], ["s"])
    for i in range(5):
        assert i not in demonstration_indices(data, "echo", "train", i, 4, seed=0)


def test_demonstrations_come_from_the_train_split_with_the_same_template():
    data = _data([f"t{i}" for i in range(8)], [f"s{i}" for i in range(4)],
                 [f"v{i}" for i in range(8)])
    examples, used = eval_examples(data, Words(), "echo", "test", limit=None,
                                   max_source_len=100, template=1, shots=3, seed=0)
    assert used == [3] * 4
    for i, ex in enumerate(examples):
        *demos, scored = ex.source.split(" => ")
        words = ex.source.split()
        assert scored.endswith(f"Second s{i}")
        assert [w for w in words if w[0] in "stv"] == [w for w in words if w[0] == "t"] + [f"s{i}"]
        assert words.count("Second") == 4 and "First" not in words


def test_length_budget_drops_demonstrations_from_the_front():
    data = _data([f"t{i}" for i in range(8)], ["s0"])
    full, used = eval_examples(data, Words(), "echo", "test", limit=None, max_source_len=100,
                               shots=4, seed=0)
    assert used == [4]
    # one demonstration "First tK => tK" is 4 words, the scored "First s0" 2: room for two
    cut, used = eval_examples(data, Words(), "echo", "test", limit=None, max_source_len=11,
                              shots=4, seed=0)
    assert used == [2] and len(cut[0].source.split()) == 10
    assert full[0].source.endswith(cut[0].source)    # the last two kept, the first two dropped
    none, used = eval_examples(data, Words(), "echo", "test", limit=None, max_source_len=3,
                               shots=4, seed=0)
    assert used == [0] and none[0].source == "First s0"


def test_a_task_without_templates_has_one_template():
    spec = TaskSpec("plain")
    example = _record("plain", "x", "x")
    assert template_count(spec) == 1 and templated(example, spec, 0) == example
    assert template_count(TaskSpec("echo", templates=["A", "B", "C"])) == 3


@pytest.mark.parametrize("override, message", [
    ({"eval_shots": -1}, r"data.eval_shots = -1 must be >= 0"),
    ({"eval_templates": "some"}, r"data.eval_templates = 'some' is invalid: expected one of 'first', 'all'"),
])
def test_bad_eval_options_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**override)


def test_table_footnotes_few_shot_runs(runs):
    _, every, shots = runs
    notes = report.evaluation_notes([every, shots, {"test": {}}])   # an older run: no "shots"
    assert notes == [f"{SHOTS}-shot test (demonstrations from each task's train split; "
                     "checkpoints chosen zero-shot), mean demonstrations used: "
                     + ", ".join(f"{t} {n:.1f}" for t, n in shots["demonstrations"].items())
                     + "."]
    rows = [{"combination": "data.eval_shots=2", "seed": "0", "task": t, "value": str(v)}
            for t, v in shots["test"].items()]
    assert markdown_table(rows, notes=notes).rstrip().endswith(notes[0])
    assert report.evaluation_notes([every]) == []


def test_a_held_out_task_draws_demonstrations_from_its_own_training_split():
    """A held-out task is never trained on, but its training split (kept apart, in
    ``held_out_train``) supplies its few-shot demonstrations, as FLAN's exemplars do."""
    spec = TaskSpec("echo", templates=["First {input}"], held_out=True)
    test = [_record("echo", x, x) for x in ("p q", "r s")]
    train = [_record("echo", x, x) for x in ("a b", "c d", "e f", "g h")]
    data = TaskData({"echo": spec}, {"echo": {"test": test}}, {"echo": train})
    examples, used = eval_examples(data, Words(), "echo", "test", limit=None,
                                   max_source_len=100, shots=2, seed=0)
    assert used == [2, 2] and "train" not in data.examples["echo"]
    for example in examples:
        assert sum(f"First {x} => {x}" in example.source for x in ("a b", "c d", "e f", "g h")) == 2


def test_the_template_spread_table():
    runs = [("a", {"templates": {"copy": {"mean": 50.0, "min": 40.0, "max": 60.0,
                                          "per_template": [60.0, 40.0, 50.0]},
                                 "one": {"mean": 1.0, "min": 1.0, "max": 1.0, "per_template": [1.0]}}}),
            ("a", {"templates": {"copy": {"mean": 70.0, "min": 60.0, "max": 80.0,
                                          "per_template": [80.0, 60.0, 70.0]}}})]
    table = report.template_table(runs)
    assert "| a | 60.0 [50.0, 70.0] |" in table and "one" not in table
    assert report.template_table([("a", {"templates": {"one": runs[0][1]["templates"]["one"]}})]) is None

"""polytask.core.data.task_data: record reading (JSONL / CSV / TSV), templates, errors, TaskData."""
import gzip
import json
import random

import pytest

from polytask.core.data.task_data import SEP, Example, TaskData, apply_template, format_source, load_task, render
from polytask.core.data.tasks import TaskSpec

RECORDS = [
    {"task": "sentiment", "instruction": "Is it positive?", "input": "a fine film", "output": "yes"},
    {"task": "sentiment", "instruction": "Is it positive?", "input": "dull {and} long", "output": "no"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def spec(tmp_path, **kw):
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", RECORDS))}
    return TaskSpec(**{"name": "sentiment", "kind": "classification", "labels": ["no", "yes"],
                       "files": files, **kw})


def test_format_source_shape():
    assert format_source("Reverse it.", "1 2 3") == f"Reverse it. {SEP} 1 2 3"
    assert format_source(" Say hi. ", "") == "Say hi."


def test_render_places_input_and_options_and_keeps_braces():
    assert render("Pick {options}:", "x {y}", ["a", "b"]) == f"Pick a, b: {SEP} x {{y}}"
    assert render("Q: {input} A:", "x {y}") == "Q: x {y} A:"


def test_jsonl_classification_labels_and_formatting(tmp_path):
    examples = load_task(spec(tmp_path), "train")
    assert [e.label for e in examples] == [1, 0]
    assert [e.target for e in examples] == ["yes", "no"]
    assert examples[1].source == f"Is it positive? {SEP} dull {{and}} long"
    assert examples[0].meta["line"] == 1 and examples[0].meta["input"] == "a fine film"


def test_templates_first_at_evaluation_sampled_in_training(tmp_path):
    s = spec(tmp_path, templates=["T0", "T1 {options}", "T2"])
    assert {e.source.split(f" {SEP}")[0] for e in load_task(s, "train")} == {"T0"}
    example = load_task(s, "train")[0]
    rng = random.Random(0)
    drawn = {apply_template(example, s, rng).source.split(f" {SEP}")[0] for _ in range(50)}
    assert drawn == {"T0", "T1 no, yes", "T2"}


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_equal_jsonl(tmp_path, suffix, delimiter):
    import csv
    path = tmp_path / f"data{suffix}"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "instruction", "input", "output"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(RECORDS)
    s = spec(tmp_path)
    from_csv = load_task(TaskSpec(**{**s.__dict__, "files": {"train": str(path)}}), "train")
    assert from_csv == load_task(s, "train")  # meta (file, line) is excluded from equality


def test_gzip_and_relative_root(tmp_path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps(RECORDS[0]) + "\n")
    s = TaskSpec(name="sentiment", kind="classification", labels=["no", "yes"],
                 files={"test": "d.jsonl.gz"})
    assert load_task(s, "test", root=tmp_path)[0].label == 1


def test_shared_mixture_file_selects_its_task(tmp_path):
    other = {"task": "other", "instruction": "x", "input": "y", "output": "z"}
    path = write_jsonl(tmp_path / "mix.jsonl", [other, *RECORDS])
    s = spec(tmp_path, files={"train": str(path)})
    assert len(load_task(s, "train")) == 2
    only_other = write_jsonl(tmp_path / "other.jsonl", [other])
    with pytest.raises(ValueError, match="no examples of task 'sentiment'"):
        load_task(spec(tmp_path, files={"train": str(only_other)}), "train")


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad\.jsonl:2: invalid JSON"),
    ('{"instruction": "i", "output": "yes", "colour": 1}', r"bad\.jsonl:2: unknown key 'colour'; allowed keys: task, instruction"),
    ('{"instruction": "i", "input": "x"}', r"bad\.jsonl:2: missing key 'output'"),
    ('{"instruction": "i", "output": "maybe"}', r"bad\.jsonl:2: label 'maybe' .* not one of no, yes"),
    ('{"instruction": "i", "output": 3}', r"bad\.jsonl:2: 'output' must be a string"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object"),
])
def test_bad_records_name_file_line_and_problem(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_task(spec(tmp_path, files={"train": str(path)}), "train")


def test_bad_split_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no 'test' split; its splits: train"):
        load_task(spec(tmp_path), "test")
    with pytest.raises(ValueError, match=r"unsupported data file type 'txt'"):
        load_task(spec(tmp_path, files={"train": str(tmp_path / "a.txt")}), "train")
    with pytest.raises(ValueError, match="data file not found"):
        load_task(spec(tmp_path, files={"train": str(tmp_path / "none.jsonl")}), "train")


def test_missing_instruction_needs_templates(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "yes"}])
    with pytest.raises(ValueError, match="missing key 'instruction'"):
        load_task(spec(tmp_path, files={"train": str(path)}), "train")
    e = load_task(spec(tmp_path, files={"train": str(path)}, templates=["Judge:"]), "train")[0]
    assert e == Example("sentiment", f"Judge: {SEP} a", "yes", 1)


def test_task_data_held_out_sizes_and_caps(tmp_path):
    trained = spec(tmp_path, max_examples=1)
    held = TaskSpec(name="held", files=dict(trained.files), templates=["Echo"], held_out=True)
    write_jsonl(tmp_path / "train.jsonl", RECORDS + [{**r, "task": "held"} for r in RECORDS])
    data = TaskData.load([trained, held])
    assert data.train_tasks == ["sentiment"] and data.held_out_tasks == ["held"]
    assert data.sizes() == {"sentiment": 2} and data.caps == {"sentiment": 1}
    assert "train" not in data.examples["held"]  # held-out tasks are never trained on
    # ... but their training split is there for few-shot demonstrations, apart from training
    assert [e.target for e in data.demonstrations("held")] == [r["output"] for r in RECORDS]
    assert data.demonstrations("sentiment") == data.examples["sentiment"]["train"]
    assert data.task_index == {"sentiment": 0, "held": 1}
    assert data.get("sentiment", "train", 0).target == "yes"
    texts = list(data.corpus())
    assert "Echo" in texts and f"Echo {SEP} a fine film" not in texts  # held-out: templates only
    assert f"Is it positive? {SEP} dull {{and}} long" in texts and "no" in texts
    with pytest.raises(ValueError, match="duplicate task names: sentiment"):
        TaskData.load([trained, trained])
    with pytest.raises(ValueError, match="every task is held out"):
        TaskData.load([held])
    with pytest.raises(ValueError, match="task 'sentiment' has no 'train' file"):
        TaskData.load([spec(tmp_path, files={"test": trained.files["train"]})])

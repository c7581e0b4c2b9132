"""polytask.experiments.suite: named suites, shipped data, regeneration and the docs table."""
import filecmp
from pathlib import Path

import pytest

from polytask.core.data.task_data import TaskData, load_task
from polytask.experiments.suite import DATA_DIR, load_examples, load_suite, markdown_table, suite_names, task_spec
from polytask.experiments.suite import build_wordnet, synthetic
from polytask.experiments.suite.catalog import TASKS

ROOT = Path(__file__).resolve().parents[2]


def test_named_suites_and_unknown_name():
    assert {"tiny", "synthetic", "wordnet", "default", "heldout"} <= set(suite_names())
    assert [s.name for s in load_suite("tiny")] == ["copy", "reverse", "parity"]
    with pytest.raises(ValueError, match="unknown suite 'nope'; known suites: tiny, synthetic, wordnet"):
        load_suite("nope")
    with pytest.raises(ValueError, match="unknown built-in task 'nope'; known tasks: copy"):
        task_spec("nope")


def test_specs_are_complete():
    for spec in load_suite("synthetic") + load_suite("wordnet"):
        assert spec.group in ("understanding", "generation") and spec.metric
        assert len(spec.templates) >= 3 and len(set(spec.templates)) == len(spec.templates)
        assert (spec.kind == "classification") == bool(spec.labels) == (spec.group == "understanding")
    assert len(task_spec("wn_lexname").labels) == 45
    from polytask.core.metrics import METRICS
    assert {TASKS[n].metric for n in TASKS} <= set(METRICS)  # every metric is registered
    held = [s.name for s in load_suite("heldout") if s.held_out]
    assert held == ["sort", "wn_reverse"]


def test_every_task_loads_with_disjoint_splits():
    for name in TASKS:
        spec = task_spec(name)
        splits = {sp: load_examples(spec, sp) for sp in ("train", "validation", "test")}
        assert len(splits["validation"]) >= 200 and len(splits["train"]) >= 2000
        inputs = {sp: {e.meta["input"] for e in ex} for sp, ex in splits.items()}
        assert not inputs["train"] & inputs["test"] and not inputs["validation"] & inputs["test"]
        if spec.kind == "classification":
            assert all(spec.labels[e.label] == e.target for e in splits["train"])
        assert splits["test"][0].source.startswith(spec.templates[0])


def test_synthetic_targets_are_correct():
    checks = {
        "copy": lambda x: x, "reverse": lambda x: " ".join(x.split()[::-1]),
        "sort": lambda x: " ".join(sorted(x.split())),
        "addition": lambda x: " ".join(str(sum(int(n.replace(" ", "")) for n in x.split(" + ")))),
        "parity": lambda x: "odd" if x.split().count("1") % 2 else "even",
        "majority": lambda x: "1" if 2 * x.split().count("1") > len(x.split()) else "0",
    }
    for name, check in checks.items():
        for e in load_task(task_spec(name), "train"):
            assert e.target == check(e.meta["input"]), (name, e)


def test_synthetic_data_regenerates_byte_for_byte(tmp_path):
    synthetic.build(seed=0, out=tmp_path)
    for path in sorted((DATA_DIR / "synthetic").glob("*.jsonl.gz")):
        assert filecmp.cmp(path, tmp_path / "synthetic" / path.name, shallow=False), path.name
    assert synthetic.generate("copy", 50, seed=1) != synthetic.generate("copy", 50, seed=0)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="wordnet-base not installed")
def test_wordnet_data_regenerates_byte_for_byte(tmp_path):
    build_wordnet.build(Path("/usr/share/wordnet"), out=tmp_path)
    for path in sorted((DATA_DIR / "wordnet").glob("*.jsonl.gz")):
        assert filecmp.cmp(path, tmp_path / "wordnet" / path.name, shallow=False), path.name


def test_wordnet_parser_on_database_lines(tmp_path):
    (tmp_path / "index.noun").write_text(
        "  1 licence header line\n"
        "dog n 2 2 @ ~ 2 1 02084071 10114209\n")
    (tmp_path / "data.noun").write_text(
        "  1 licence header line\n"
        '02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked"\n')
    assert build_wordnet.read_index(tmp_path, "n") == {"dog": (1, ["02084071", "10114209"])}
    synset = build_wordnet.read_data(tmp_path, "n")["02084071"]
    assert synset["lexname"] == "noun.animal" and synset["words"] == ["dog", "domestic_dog"]
    assert synset["pointers"] == [("@", "02083346", "n", 0, 0)]
    assert build_wordnet.definition(synset["gloss"]) == "a member of the genus Canis"
    (tmp_path / "index.noun").write_text("dog n two\n")
    with pytest.raises(ValueError, match=r"index.noun:1: malformed index line"):
        build_wordnet.read_index(tmp_path, "n")


def test_default_suite_mixes_groups_and_trains():
    data = TaskData.load(load_suite("default"))
    groups = {data.specs[t].group_name for t in data.train_tasks}
    assert groups == {"understanding", "generation"}
    assert sum(data.sizes().values()) < 20000  # minutes on a 2-core CPU


def test_docs_table_is_current_and_data_is_small():
    assert markdown_table() in (ROOT / "docs" / "tasks.md").read_text()
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 2_000_000
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (DATA_DIR / "WORDNET_LICENSE").read_text()


def test_tiny_suite_end_to_end_to_a_batch():
    """Suite -> TaskData -> tokenizer -> mixture sampler -> templates -> collate -> Batch."""
    import random

    from polytask.core.data.collate import collate
    from polytask.core.data.sampling import MixtureSampler
    from polytask.core.data.tokenizer import Tokenizer

    data = TaskData.load(load_suite("tiny"))
    tok = Tokenizer.train(data.corpus(), vocab_size=64)
    sampler = MixtureSampler(data.sizes(), "temperature", seed=0)
    rng = random.Random(0)
    rows = [data.get(task, "train", i, rng) for task, i in sampler.next_batch(16)]
    batch = collate(rows, tok, data.task_index, max_source_len=128, max_target_len=16,
                    truncation="error")
    assert batch.task_ids.tolist() == [data.task_index[r.task] for r in rows]
    assert tok.decode_batch(batch.labels.clamp(min=0)) == [r.target for r in rows]
    assert tok.decode_batch(batch.src) == [r.source for r in rows]
    parity = batch.task_ids == data.task_index["parity"]
    assert parity.any() and (batch.class_ids[parity] >= 0).all() and (batch.class_ids[~parity] < 0).all()

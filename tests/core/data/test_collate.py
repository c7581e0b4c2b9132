"""polytask.core.data.collate: teacher-forcing shift, padding, class ids, truncation modes, length buckets."""
import random

import pytest
import torch

from polytask.core.data.batch import IGNORE_INDEX
from polytask.core.data.collate import CollateReport, collate, length_buckets
from polytask.core.data.task_data import SEP, Example
from polytask.core.data.tokenizer import Tokenizer

ROWS = [
    Example("copy", f"Copy the sequence. {SEP} 1 2 3", "1 2 3", meta={"file": "copy.jsonl", "line": 1}),
    Example("parity", f"Is the number of ones odd or even? {SEP} 1 0 1 1 0 1", "even", 0),
    Example("copy", f"Copy the sequence. {SEP} 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9", "4 5 6 7 8 9 0 1", meta={"file": "copy.jsonl", "line": 7}),
]
TASKS = {"copy": 0, "parity": 1}


@pytest.fixture(scope="module")
def tok():
    corpus = [r.source for r in ROWS] + [r.target for r in ROWS] + ["odd even 0 1 2 3 4 5 6 7 8 9"] * 5
    return Tokenizer.train(corpus, vocab_size=40, hard_vocab_limit=False)


def test_shift_padding_masks_and_class_ids(tok):
    batch = collate(ROWS, tok, TASKS, max_source_len=64, max_target_len=32)
    assert batch.task_ids.tolist() == [0, 1, 0]
    assert batch.class_ids.tolist() == [IGNORE_INDEX, 0, IGNORE_INDEX]
    for i, row in enumerate(ROWS):
        src, y = tok.encode(row.source), tok.encode(row.target)
        assert batch.src[i, :len(src)].tolist() == src and batch.src_mask[i].sum() == len(src)
        assert batch.src[i, len(src):].eq(tok.pad_id).all()
        n = len(y) + 1
        assert batch.tgt_in[i, :n].tolist() == [tok.bos_id] + y
        assert batch.labels[i, :n].tolist() == y + [tok.eos_id]
        assert batch.tgt_mask[i].sum() == n and batch.tgt_in[i, n:].eq(tok.pad_id).all()
        assert batch.labels[i, n:].eq(IGNORE_INDEX).all()
        assert tok.decode(batch.labels[i].clamp(min=0)) == row.target  # the oracle: text back
    # teacher forcing: the decoder input is the label sequence shifted right by one
    real = batch.tgt_mask[:, 1:]
    assert torch.equal(batch.tgt_in[:, 1:][real], batch.labels[:, :-1][real])


def test_truncate_cuts_and_counts(tok):
    report = CollateReport()
    batch = collate(ROWS, tok, TASKS, max_source_len=6, max_target_len=3, report=report)
    assert batch.src.shape[1] == 6 and batch.tgt_in.shape[1] == 3
    assert report.truncated_source == {"copy": 2, "parity": 1}
    assert report.truncated_target["copy"] == 2
    assert tok.eos_id not in batch.labels[2].tolist()  # a cut target has no false end


def test_error_names_task_and_example(tok):
    limit = max(len(tok.encode(r.source)) for r in ROWS[:2])  # only the last row is too long
    with pytest.raises(ValueError, match=rf"example of task 'copy' \(copy.jsonl:7\): source has \d+ tokens > max_source_len {limit}"):
        collate(ROWS, tok, TASKS, max_source_len=limit, max_target_len=32, truncation="error")


def test_drop_reports_rows_and_warns_without_report(tok):
    report = CollateReport()
    batch = collate(ROWS, tok, TASKS, max_source_len=64, max_target_len=6, truncation="drop", report=report)
    assert len(batch) == 2 and batch.task_ids.tolist() == [0, 1]
    assert report.dropped == {"copy": 1} and "copy.jsonl:7" in report.dropped_examples[0]
    with pytest.warns(UserWarning, match="1 of 3 rows did not fit"):
        collate(ROWS, tok, TASKS, max_source_len=64, max_target_len=6, truncation="drop")
    with pytest.raises(ValueError, match="every row of the batch was dropped"):
        collate(ROWS, tok, TASKS, max_source_len=2, max_target_len=32, truncation="drop", report=report)


@pytest.mark.parametrize("kwargs,message", [
    ({"truncation": "wrap"}, "unknown truncation 'wrap'; choose truncate, error or drop"),
    ({"max_target_len": 1}, r"max_target_len \(1\) > 1"),
])
def test_invalid_arguments(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        collate(ROWS, tok, TASKS, **{"max_source_len": 8, "max_target_len": 8, **kwargs})
    with pytest.raises(ValueError, match="task 'parity' is not in task_index"):
        collate(ROWS, tok, {"copy": 0}, max_source_len=8, max_target_len=8)


def test_length_buckets_partition_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(1000)]
    batches = length_buckets(lengths, 16, pool=20, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    order = list(range(1000))
    rng.shuffle(order)
    unbucketed = [order[i:i + 16] for i in range(0, 1000, 16)]
    assert padding(batches) < padding(unbucketed) / 5
    assert batches == length_buckets(lengths, 16, pool=20, seed=1)

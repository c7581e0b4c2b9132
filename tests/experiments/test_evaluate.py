"""Evaluation of a ``head: rank`` task uses the task's own RankHead, so ``sharing.rank_normalize``
reaches ``predict`` / ``evaluate`` (a regression: they once scored every rank task with
``rank_classify``'s default ``normalize="sum"``).

The labels differ a lot in token length ("no" vs a long phrase). Under a randomly initialised
model every token costs about log V nats, so the summed log-likelihood almost always picks the
short label while the per-token mean does not: the precondition below asserts the two
normalisations disagree on some example, so the test cannot pass vacuously.
"""
import json

import pytest
import torch

from polytask.core.data.collate import CollateReport, collate
from polytask.core.data.task_data import SEP, TaskData
from polytask.core.data.tasks import TaskSpec
from polytask.core.data.tokenizer import Tokenizer
from polytask.core.metrics import compute_metrics
from polytask.core.model.config import ModelConfig
from polytask.experiments.evaluate import evaluate, predict
from polytask.heads import build_model
from polytask.heads.config import SharingConfig
from polytask.heads.rank import rank_classify

TASK = "answer"
LABELS = ["no", "absolutely and certainly yes indeed"]
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "tree", "house", "river", "stone"]
LIMIT, BATCH = 12, 5                        # three batches, the last one partial
OPTS = dict(limit=LIMIT, batch_size=BATCH, max_source_len=32, max_target_len=16, max_new_tokens=4)


def _records(n, offset):
    for i in range(n):
        j = i + offset
        yield {"task": TASK, "instruction": "Answer the question.",
               "input": f"is the {WORDS[j % 10]} {WORDS[(3 * j + 1) % 10]} ?",
               "output": LABELS[1] if j % 4 == 0 else LABELS[0]}   # unbalanced: 1 in 4 long


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_eval")
    spec = TaskSpec(TASK, kind="classification", labels=LABELS, head="rank",
                    files={"train": _write(root / "train.jsonl", _records(40, 0)),
                           "test": _write(root / "test.jsonl", _records(LIMIT + 3, 100))})
    data = TaskData.load([spec])
    corpus = list(data.corpus()) * 4 + [f"Answer the question. {SEP} {w}" for w in WORDS]
    tokenizer = Tokenizer.train(corpus, vocab_size=60, model_type="bpe")
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                      bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, d_model=32, n_heads=2,
                      n_encoder_layers=1, n_decoder_layers=1, d_ff=64, dropout=0.0, max_length=64)
    torch.manual_seed(1234)
    model = build_model(cfg, [spec], SharingConfig(rank_normalize="mean"))
    return data, tokenizer, model, spec


def _rank_choices(model, data, tokenizer, spec, normalize):
    """Labels picked by ``rank_classify`` with ``normalize`` on the batches ``predict`` builds."""
    examples = [data.get(TASK, "test", i) for i in range(LIMIT)]
    candidates = [tokenizer.encode(label) for label in spec.labels]
    view, picks = model.for_task(TASK), []
    model.eval()
    with torch.no_grad():
        for start in range(0, LIMIT, BATCH):
            batch = collate(examples[start:start + BATCH], tokenizer, data.task_index,
                            max_source_len=OPTS["max_source_len"],
                            max_target_len=OPTS["max_target_len"], truncation="truncate",
                            report=CollateReport())
            choice, _ = rank_classify(view, batch.src, batch.src_mask, candidates, normalize=normalize)
            picks += [spec.labels[i] for i in choice.tolist()]
    return picks, [ex.target for ex in examples]


def test_labels_differ_in_length_and_normalisations_disagree(setup):
    data, tokenizer, model, spec = setup
    lengths = [len(tokenizer.encode(label)) for label in LABELS]
    assert lengths[1] >= 4 * lengths[0], lengths
    assert model.head(TASK).normalize == "mean"
    mean, _ = _rank_choices(model, data, tokenizer, spec, "mean")
    total, _ = _rank_choices(model, data, tokenizer, spec, "sum")
    assert mean != total, "precondition: 'sum' and 'mean' must pick differently on some example"


def test_predict_uses_the_configured_rank_normalisation(setup):
    data, tokenizer, model, spec = setup
    want, refs = _rank_choices(model, data, tokenizer, spec, "mean")
    total, _ = _rank_choices(model, data, tokenizer, spec, "sum")
    assert want != total                                 # not vacuous (see the test above)
    model.train()
    preds, got_refs = predict(model, data, tokenizer, TASK, "test", **OPTS)
    assert model.training                                # predict restores the mode
    assert got_refs == refs and len(preds) == LIMIT
    assert preds == want


def test_evaluate_reports_accuracy_of_mean_normalised_predictions(setup):
    data, tokenizer, model, spec = setup
    want, refs = _rank_choices(model, data, tokenizer, spec, "mean")
    total, _ = _rank_choices(model, data, tokenizer, spec, "sum")
    expected = compute_metrics("accuracy", want, refs)
    assert expected != compute_metrics("accuracy", total, refs)   # the two scores differ
    scores = evaluate(model, data, tokenizer, "test", **OPTS)
    # one seen task, none held out: both means are its score (and the legacy "average")
    assert scores == pytest.approx({TASK: expected, "average_seen": expected, "average": expected})

"""Metrics: hand-worked values, a direct re-computation of macro-F1, and the registry's errors."""
import builtins
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.core.metrics import (METRICS, accuracy, bleu, chrf, compute_metrics, exact_match, macro_f1,
                          normalize_whitespace, rouge_l)
from polytask.core.data.tasks import TaskSpec


def test_accuracy_hand_worked():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 50.0
    assert accuracy(["yes", "no", "no"], ["yes", "no", "yes"]) == pytest.approx(200 / 3)


def test_macro_f1_hand_worked_counts_labels_never_predicted():
    refs = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "a"]
    # a: tp=1 fp=1 fn=1 -> F1 = 2/4; b: tp=1 fp=1 fn=0 -> 2/3; c: never predicted -> 0.
    assert macro_f1(preds, refs) == pytest.approx(100 * (0.5 + 2 / 3 + 0) / 3)
    # An explicit label set adds "d" (never predicted, never seen) with F1 = 0.
    assert macro_f1(preds, refs, labels=["a", "b", "c", "d"]) == pytest.approx(
        100 * (0.5 + 2 / 3) / 4)


def test_macro_f1_majority_predictor_is_punished():
    refs = [0] * 8 + [1] * 2
    preds = [0] * 10
    assert accuracy(preds, refs) == 80.0
    # label 0: tp=8 fp=2 -> F1 = 16/18; label 1: F1 = 0.
    assert macro_f1(preds, refs, labels=[0, 1]) == pytest.approx(100 * (16 / 18) / 2)


def _macro_f1_by_confusion_matrix(preds, refs, n_labels):
    """The textbook computation: confusion matrix -> precision, recall -> F1 per class."""
    cm = np.zeros((n_labels, n_labels))
    for p, r in zip(preds, refs):
        cm[r, p] += 1
    f1s = []
    for c in range(n_labels):
        tp = cm[c, c]
        precision = tp / cm[:, c].sum() if cm[:, c].sum() else 0.0
        recall = tp / cm[c, :].sum() if cm[c, :].sum() else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return 100 * float(np.mean(f1s))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda k: st.tuples(
    st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)),
                         min_size=1, max_size=30))))
def test_macro_f1_matches_confusion_matrix_recomputation(case):
    n_labels, pairs = case
    preds = [p for p, _ in pairs]
    refs = [r for _, r in pairs]
    expected = _macro_f1_by_confusion_matrix(preds, refs, n_labels)
    assert macro_f1(preds, refs, labels=list(range(n_labels))) == pytest.approx(expected)


def test_exact_match_normalises_whitespace():
    assert normalize_whitespace("  the \t cat\n sat ") == "the cat sat"
    assert exact_match(["the  cat ", "a dog", "Cat"], ["the cat", "a cat", "cat"]) == \
        pytest.approx(100 / 3)
    assert exact_match(["b"], [["a", " b"]]) == 100.0  # any of several references


def test_bleu_hand_worked():
    # Every n-gram precision is 1 (5/5, 4/4, 3/3, 2/2); only the brevity penalty
    # exp(1 - ref_len / hyp_len) = exp(1 - 6/5) acts.
    score = bleu(["the cat sat on the"], ["the cat sat on the mat"])
    assert score == pytest.approx(100 * math.exp(1 - 6 / 5), abs=1e-6)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)


def test_bleu_with_multiple_references_uses_the_best_match():
    refs = [["a totally different sentence here", "the cat sat on the mat"]]
    assert bleu(["the cat sat on the mat"], refs) == pytest.approx(100)


def test_chrf_bounds_and_order():
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100)
    assert chrf(["xyz"], ["abc"]) == pytest.approx(0)
    close = chrf(["the cat sad"], ["the cat sat"])
    far = chrf(["a dog ran"], ["the cat sat"])
    assert 0 < far < close < 100


def test_rouge_l_hand_worked():
    # LCS("the cat sat", "the cat on the mat") = "the cat": P = 2/3, R = 2/5,
    # F = 2PR / (P + R) = (8/15) / (16/15) = 1/2.
    assert rouge_l(["the cat sat"], ["the cat on the mat"]) == pytest.approx(50.0)
    # Mean over examples: (50 + 100) / 2.
    assert rouge_l(["the cat sat", "a b"], ["the cat on the mat", "a b"]) == pytest.approx(75.0)


def test_compute_metrics_dispatches_by_task_spec_name():
    spec = TaskSpec(name="sentiment", kind="classification", labels=["pos", "neg", "neu"],
                    metric="macro_f1")
    preds, refs = ["pos", "pos"], ["pos", "neg"]
    # pos: tp=1 fp=1 -> 2/3; neg: 0; neu: 0 (in the label set, never seen).
    assert compute_metrics(spec.metric_name, preds, refs, labels=spec.labels) == \
        pytest.approx(100 * (2 / 3) / 3)
    gen = TaskSpec(name="copy")
    assert compute_metrics(gen.metric_name, ["a b"], ["a  b"]) == 100.0


def test_every_registered_metric_returns_0_to_100():
    for name in METRICS:
        value = compute_metrics(name, ["the cat sat", "a dog"], ["the cat sat", "a cat"])
        assert 0.0 <= value <= 100.0, name


def test_unknown_metric_lists_the_choices():
    with pytest.raises(ValueError, match="bogus.*accuracy.*bleu"):
        compute_metrics("bogus", ["a"], ["a"])


def test_length_mismatch_and_empty_input_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="0 examples"):
        bleu([], [])


def test_missing_optional_library_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sacrebleu") or name.startswith("rouge_score"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[metrics\]'"):
        bleu(["a"], ["a"])
    with pytest.raises(ImportError, match=r"pip install -e '\.\[metrics\]'"):
        rouge_l(["a"], ["a"])

"""Evaluation metrics for the tasks of a run, by name.

Convention: **every metric returns a float in [0, 100]** (a percentage), the scale sacrebleu
uses for BLEU and chrF, so a results table never mixes 0-1 and 0-100 columns.

Metrics:
    accuracy     share of predictions equal to their reference.
    macro_f1     unweighted mean of per-label F1 over the label set (labels never predicted,
                 or never seen, count with F1 = 0 unless they are absent from both sides and
                 no label set was given; Sokolova & Lapalme 2009 "macro-averaging").
    exact_match  accuracy after whitespace normalisation (strip, collapse runs of spaces), as
                 SQuAD's EM without its punctuation/article stripping.
    bleu         corpus BLEU (Papineni et al. 2002) by sacrebleu, default 13a tokenisation.
    chrf         corpus chrF (Popovic 2015) by sacrebleu.
    rouge_l      mean sentence-level ROUGE-L F-measure (Lin 2004) by Google's rouge-score.

BLEU, chrF and ROUGE-L need the ``metrics`` extra: ``pip install -e '.[metrics]'``.
References for the text metrics may be one string per example or a list of strings per
example (several references).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Label = str | int
MetricFn = Callable[..., float]

_EXTRA_HINT = "install the metrics extra: pip install -e '.[metrics]'"


def _check_pair(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "they must pair up one to one")
    if len(predictions) == 0:
        raise ValueError("cannot compute a metric over 0 examples")


def accuracy(predictions: Sequence[Label], references: Sequence[Label]) -> float:
    """Percentage of ``predictions[i] == references[i]``."""
    _check_pair(predictions, references)
    return 100.0 * sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: Sequence[Label], references: Sequence[Label],
             labels: Sequence[Label] | None = None) -> float:
    """Macro-averaged F1 over ``labels`` (default: every label in references or predictions).

    Per label c: precision = tp / (tp + fp), recall = tp / (tp + fn), F1 = 2PR / (P + R),
    with 0/0 taken as 0 (scikit-learn's ``zero_division=0``). A label in ``labels`` that is
    never predicted still counts, which is what makes macro-F1 punish a majority-class
    predictor. A prediction outside ``labels`` counts as wrong (a false negative of its
    reference) but adds no class of its own.
    """
    _check_pair(predictions, references)
    label_set = list(labels) if labels is not None else sorted(
        set(references) | set(predictions), key=str)
    if not label_set:
        raise ValueError("macro_f1 needs at least one label")
    f1s = []
    for c in label_set:
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp = sum(p == c and r != c for p, r in zip(predictions, references))
        fn = sum(p != c and r == c for p, r in zip(predictions, references))
        # F1 = 2tp / (2tp + fp + fn): the same as 2PR/(P+R) and 0 when tp = 0.
        denominator = 2 * tp + fp + fn
        f1s.append(2 * tp / denominator if denominator else 0.0)
    return 100.0 * sum(f1s) / len(f1s)


def normalize_whitespace(text: str) -> str:
    """Strip the ends and collapse every run of whitespace to one space."""
    return " ".join(str(text).split())


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Percentage of predictions equal to (any of) their reference(s) after
    :func:`normalize_whitespace`."""
    _check_pair(predictions, references)
    hits = 0
    for p, refs in zip(predictions, _as_reference_lists(references)):
        hits += normalize_whitespace(p) in {normalize_whitespace(r) for r in refs}
    return 100.0 * hits / len(predictions)


def _as_reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """One list of reference strings per example."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants references transposed: stream k holds every example's k-th reference.
    Examples with fewer references are padded with None, which sacrebleu skips."""
    per_example = _as_reference_lists(references)
    n_streams = max(len(r) for r in per_example)
    if min(len(r) for r in per_example) == 0:
        raise ValueError("every example needs at least one reference")
    return [[refs[k] if k < len(refs) else None for refs in per_example]
            for k in range(n_streams)]


def _import_sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError as err:  # optional dependency
        raise ImportError(f"bleu and chrf need sacrebleu; {_EXTRA_HINT}") from err
    return sacrebleu


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU by ``sacrebleu.corpus_bleu`` (0-100)."""
    _check_pair(predictions, references)
    sacrebleu = _import_sacrebleu()
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (character 6-grams, beta = 2) by ``sacrebleu.corpus_chrf`` (0-100)."""
    _check_pair(predictions, references)
    sacrebleu = _import_sacrebleu()
    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of the ROUGE-L F-measure (0-100) by ``rouge_score``; with several
    references an example scores its best one (``score_multi``). No stemming; rouge-score's
    default tokenizer lowercases and keeps only [a-z0-9] tokens."""
    _check_pair(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # optional dependency
        raise ImportError(f"rouge_l needs rouge-score; {_EXTRA_HINT}") from err
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for p, refs in zip(predictions, _as_reference_lists(references)):
        total += scorer.score_multi(refs, p)["rougeL"].fmeasure
    return 100.0 * total / len(predictions)


# Each is higher-better; a lower-better metric added here must also be listed in
# polytask.experiments.stats.LOWER_IS_BETTER (the report signs its relative changes by it).
METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "exact_match": exact_match,
    "bleu": bleu,
    "chrf": chrf,
    "rouge_l": rouge_l,
}


def get_metric(name: str) -> MetricFn:
    """The metric function registered as ``name``; unknown names raise ``ValueError``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choices: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def compute_metrics(metric_name: str, predictions: Sequence[Any], references: Sequence[Any],
                    *, labels: Sequence[Label] | None = None) -> float:
    """Score ``predictions`` against ``references`` with the metric named ``metric_name``
    (usually ``TaskSpec.metric_name``), in [0, 100].

    ``labels`` (a classification task's ``TaskSpec.labels``) fixes the label set of
    ``macro_f1``; other metrics ignore it.
    """
    fn = get_metric(metric_name)
    if fn is macro_f1:
        return macro_f1(predictions, references, labels=labels)
    return fn(predictions, references)

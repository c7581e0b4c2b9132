"""Task heads: classifier pooling and rank classification (T0)."""
from __future__ import annotations

import pytest
import torch

from polytask.heads import ClassifierHead, SharingConfig, build_model, label_scores, pool, rank_classify
from heads_tiny import make_batch, three_tasks, tiny_config


def test_mean_pooling_is_the_mean_over_real_tokens_only():
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.stack([hidden[i, mask[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(pool(hidden, mask, "mean"), expected)
    torch.testing.assert_close(pool(hidden, mask, "first"), hidden[:, 0])
    assert torch.equal(pool(hidden, torch.zeros_like(mask), "mean"), torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="pooling 'max' is not one of mean, first"):
        pool(hidden, mask, "max")


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_classifier_logits_ignore_padding(pooling):
    head = ClassifierHead(4, 3, hidden=8, pooling=pooling).double()
    hidden = torch.randn(2, 6, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    junk = hidden.masked_fill(~mask[..., None], 1e3)
    torch.testing.assert_close(head(junk, mask), head(hidden, mask))
    assert head(hidden, mask).shape == (2, 3)


def test_model_classifier_rows_ignore_what_sits_in_padding():
    """End to end: changing padded source tokens leaves a classifier row's logits unchanged."""
    model = build_model(tiny_config(), three_tasks(), SharingConfig(strategy="hard")).double()
    batch = make_batch([1, 1, 1, 0])
    noisy = batch.select(torch.arange(len(batch)))
    noisy.src = batch.src.masked_fill(~batch.src_mask, 7)
    a, b = model(batch).tasks["cls"], model(noisy).tasks["cls"]
    torch.testing.assert_close(a.logits, b.logits, atol=1e-10, rtol=0)


def _oracle_scores(view, src, src_mask, candidates, normalize):
    """Score each label separately with the backbone's plain forward pass."""
    cfg = view.config
    scores = torch.empty(src.shape[0], len(candidates), dtype=torch.float64)
    for i in range(src.shape[0]):
        for c, ids in enumerate(candidates):
            tgt_in = torch.tensor([[cfg.bos_id] + ids[:-1]])
            logits = view(src[i:i + 1], tgt_in, src_mask[i:i + 1],
                          torch.ones_like(tgt_in, dtype=torch.bool))
            lp = logits.log_softmax(-1)[0, torch.arange(len(ids)), torch.tensor(ids)].sum()
            scores[i, c] = lp / len(ids) if normalize == "mean" else lp
    return scores


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_rank_classify_picks_the_label_the_decoder_finds_most_likely(normalize):
    model = build_model(tiny_config(), three_tasks(), SharingConfig(strategy="hierarchical",
                                                                    shared_layers=1)).double()
    view = model.for_task("rnk")
    batch = make_batch([2, 2, 2])
    candidates = [[5, 3], [9, 11, 13, 3], [20, 21, 3]]  # uneven lengths: padding inside
    pred, scores = rank_classify(view, batch.src, batch.src_mask, candidates, normalize)
    oracle = _oracle_scores(view, batch.src, batch.src_mask, candidates, normalize)
    torch.testing.assert_close(scores, oracle, atol=1e-9, rtol=0)
    assert torch.equal(pred, oracle.argmax(-1))
    assert scores.shape == (3, 3) and bool((scores <= 0).all())


def test_rank_classify_validates_its_inputs():
    model = build_model(tiny_config(), three_tasks(), SharingConfig())
    batch = make_batch([2])
    with pytest.raises(ValueError, match="normalize 'max' is not one of sum, mean"):
        label_scores(model.for_task("rnk"), batch.src, batch.src_mask, [[4, 3]], "max")
    with pytest.raises(ValueError, match="non-empty verbalisation"):
        label_scores(model.for_task("rnk"), batch.src, batch.src_mask, [[4, 3], []])


def test_predict_class_uses_the_tasks_head():
    model = build_model(tiny_config(), three_tasks(), SharingConfig(rank_normalize="mean")).double()
    batch = make_batch([1, 1, 2])
    cls_pred = model.predict_class("cls", batch.src, batch.src_mask)
    view = model.for_task("cls")
    logits = model.head("cls")(view.encode(batch.src, batch.src_mask), batch.src_mask)
    assert torch.equal(cls_pred, logits.argmax(-1))
    candidates = [[5, 3], [9, 11, 3]]
    rank_pred = model.predict_class("rnk", batch.src, batch.src_mask, candidates)
    expected, _ = rank_classify(model.for_task("rnk"), batch.src, batch.src_mask, candidates, "mean")
    assert torch.equal(rank_pred, expected)
    with pytest.raises(ValueError, match="classifier or rank task, got 'gen'"):
        model.predict_class("gen", batch.src, batch.src_mask)
    with pytest.raises(ValueError, match="rank head: pass the labels' token ids"):
        model.predict_class("rnk", batch.src, batch.src_mask)

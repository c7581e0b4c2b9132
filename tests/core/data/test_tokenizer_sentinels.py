"""Tokenizer sentinels: T5's <extra_id_k> pieces after the special ids, never split, kept by
save / load; mask_id reuses <extra_id_0>."""
import numpy as np
import pytest

from polytask.core.data.noising import reconstruct, span_corruption
from polytask.core.data.task_data import SEP
from polytask.core.data.tokenizer import Tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "a plan of action adopted by a person",
          f"Define the word. {SEP} policy", "Give the opposite of the word. [SEP] dependent",
          "We hold these truths to be self evident, that all are created equal."] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=70, sentinels=8)


def test_sentinels_follow_the_special_ids_in_order(tok):
    assert tok.sentinel_ids == list(range(5, 13))
    assert [tok.id_to_piece(i) for i in tok.sentinel_ids] == [f"<extra_id_{k}>" for k in range(8)]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3, 4)
    assert tok.id_to_piece(4) == SEP and tok.vocab_size == 70
    assert tok.mask_id == tok.sentinel_ids[0]


def test_sentinels_are_never_split(tok):
    ids = tok.encode("the fox<extra_id_3> dog <extra_id_0>plan")
    assert tok.sentinel_ids[3] in ids and tok.sentinel_ids[0] in ids
    assert not set(tok.sentinel_ids) & set(tok.encode("the extra id fox < > _ 0"))


def test_save_load_keeps_sentinels(tok, tmp_path):
    tok.save(tmp_path / "t.model")
    again = Tokenizer.load(tmp_path / "t.model")
    assert again.sentinel_ids == tok.sentinel_ids and again.mask_id == tok.mask_id


def test_no_sentinels_by_default_and_special_ids_unchanged():
    plain = Tokenizer.train(CORPUS, vocab_size=60)
    with_them = Tokenizer.train(CORPUS, vocab_size=60, sentinels=3)
    assert plain.sentinel_ids == []
    with pytest.raises(ValueError, match="sentinels >= 1"):
        plain.mask_id
    for name in ("pad_id", "unk_id", "bos_id", "eos_id", "sep_id"):
        assert getattr(plain, name) == getattr(with_them, name)
    assert plain.id_to_piece(5) != "<extra_id_0>" and with_them.id_to_piece(5) == "<extra_id_0>"


@pytest.mark.parametrize("kwargs,match", [({"vocab_size": 10, "sentinels": 5}, "5 sentinels"),
                                          ({"vocab_size": 60, "sentinels": -1}, "sentinels")])
def test_bad_sentinel_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer.train(CORPUS, **kwargs)


def test_span_corruption_round_trip_through_text(tok):
    text = "We hold these truths to be self evident."
    ids = tok.encode(text)
    inputs, targets = span_corruption(ids, np.random.default_rng(0), sentinel_ids=tok.sentinel_ids)
    assert tok.decode(reconstruct(inputs, targets, tok.sentinel_ids)) == text
    assert "<extra_id_0>" in tok.decode(inputs) and tok.decode(targets).startswith("<extra_id_0>")

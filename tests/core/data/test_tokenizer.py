"""polytask.core.data.tokenizer.Tokenizer: special ids, round trips, save / load, vocabulary-size errors."""
import os
import tempfile

import pytest
import torch

from polytask.core.model.config import ModelConfig
from polytask.core.data.task_data import SEP
from polytask.core.data.tokenizer import Tokenizer

CORPUS = [f"Reverse the sequence. {SEP} {i % 10} {(i * 7) % 10} {(i * 3) % 10}" for i in range(200)] + [
    "The quick brown fox jumps over the lazy dog.", "a plan of action adopted by an individual",
    "Define the word. [SEP] policy", "Give the opposite of the word. [SEP] dependent"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=64)


def test_special_ids_match_model_config_defaults(tok):
    cfg = ModelConfig()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (0, 2, 3)
    assert (tok.unk_id, tok.sep_id) == (1, 4) and tok.id_to_piece(4) == SEP
    assert tok.vocab_size == 64


def test_sep_is_one_token_and_no_special_ids_appear_in_plain_text(tok):
    ids = tok.encode(f"Define the word. {SEP} dog")
    assert ids.count(tok.sep_id) == 1
    assert not {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id} & set(ids)


@pytest.mark.parametrize("text", ["Reverse the sequence. [SEP] 3 1 4", "The lazy fox.", "a plan [SEP] of action"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_stops_at_eos_and_skips_pad_and_bos(tok):
    ids = tok.encode("the lazy dog")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, *tok.encode("fox"), tok.pad_id]) == "the lazy dog"
    rows = torch.tensor([[tok.bos_id, *ids, tok.eos_id], [tok.bos_id, *ids, tok.pad_id]])
    assert tok.decode_batch(rows) == ["the lazy dog", "the lazy dog"]
    assert tok.encode_batch(["the lazy dog", "fox"]) == [ids, tok.encode("fox")]


def test_save_load_same_ids(tok, tmp_path):
    tok.save(tmp_path / "spm.model")
    loaded = Tokenizer.load(tmp_path / "spm.model")
    assert all(loaded.encode(t) == tok.encode(t) for t in CORPUS[::37])
    with pytest.raises(ValueError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "missing.model")


def test_training_leaves_no_files_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tempfile.gettempdir()))
    Tokenizer.train(CORPUS, vocab_size=80, model_type="bpe")
    assert os.listdir(tmp_path) == []
    assert set(os.listdir(tempfile.gettempdir())) - before == set()


def test_bpe_round_trip():
    tok = Tokenizer.train(CORPUS, vocab_size=80, model_type="bpe")
    assert tok.sep_id == 4 and tok.decode(tok.encode(CORPUS[5])) == CORPUS[5]


def test_too_large_vocab_fails_clearly_or_shrinks():
    small = ["ab ba", "abba"]
    with pytest.raises(ValueError, match=r"vocabulary of 500 .* Lower data.vocab_size or pass hard_vocab_limit=False"):
        Tokenizer.train(small, vocab_size=500, fit_vocab=False)
    with pytest.raises(ValueError, match=r"vocabulary of 6 .*smaller than required_chars.* Raise data.vocab_size"):
        Tokenizer.train(["abcdefgh"], vocab_size=6)
    shrunk = Tokenizer.train(small, vocab_size=500, hard_vocab_limit=False)
    assert 5 < shrunk.vocab_size < 500 and shrunk.decode(shrunk.encode("abba")) == "abba"


@pytest.mark.parametrize("kwargs,message", [
    ({"vocab_size": 100, "model_type": "word"}, "unknown model_type 'word'"),
    ({"vocab_size": 5}, r"vocab_size \(5\) must exceed the 5 special ids"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.train(CORPUS, **kwargs)
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", "  "], vocab_size=50)


def test_split_digits_spells_every_digit_as_its_own_piece():
    """A corpus where a number is common gets a piece for it; with ``split_digits`` every
    digit is one piece, so numbers tokenize alike whatever the corpus held."""
    corpus = [f"chapter 31 of {w} says 31 things" for w in ("the book", "a play", "one poem")]
    corpus = corpus * 40 + ["digits 2 3 4 5 6 7 8 9 0 1 appear once"]
    plain = Tokenizer.train(corpus, 60, hard_vocab_limit=False)
    split = Tokenizer.train(corpus, 60, hard_vocab_limit=False, split_digits=True)

    def pieces(tok, text):
        return [tok.id_to_piece(i) for i in tok.encode(text)]
    def merged(tok, text):   # pieces holding a digit and something else (a space, a digit)
        return [p for p in pieces(tok, text) if len(p) > 1 and any(c.isdigit() for c in p)]
    assert merged(plain, "31 3") and not merged(split, "31 3 1 2 2024")
    assert pieces(split, "1 2 31") == ["▁", "1", "▁", "2", "▁", "3", "1"]
    assert split.decode(split.encode("1 2 31")) == "1 2 31"

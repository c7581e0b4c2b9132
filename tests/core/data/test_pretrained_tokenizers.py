"""polytask.core.data.pretrained_tokenizers against Hugging Face's tokenizers of the same files.

Nothing is downloaded: a T5 sentencepiece model (T5's layout: pad 0, eos 1, unk 2, no bos) and
a BART byte-level BPE are trained here on a small corpus, written as a checkpoint directory would
hold them, and loaded both by polytask and by ``transformers`` (the oracle):
``encode`` = ``hf(t, add_special_tokens=False)``, ``encode_source`` = ``hf(t)["input_ids"]``,
``decode`` = ``hf.decode(ids, skip_special_tokens=True)``.
"""
import io
import json
import os
import random

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from polytask.core.data.collate import collate  # noqa: E402
from polytask.core.data.pretrained_tokenizers import BartBPE, T5SentencePiece, load_tokenizer  # noqa: E402
from polytask.core.data.task_data import SEP, Example  # noqa: E402
from polytask.core.data.tokenizer import TextTokenizer, Tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "translate English to German: That is good.",
    f"Reverse the sequence. {SEP} 3 1 4 1 5 9 2 6", f"Define the word. {SEP} policy",
    "café naïve résumé façade Ångström Øresund", "東京は日本の首都です。中文和English混合",
    "emoji 😀🎉 party 👍", "digits 1234567890 and 3.14159, $100 & 50% off #tag",
    "punctuation!?.,;:'\"()[]{} don't stop — it's fine…", "Ελληνικά κείμενο Русский текст",
    "question: what is 2+2? answer: 4", "summarize: the cat sat on the mat with another cat",
    "email@example.com http://x.y/z?q=1", "mixed CASE Words and quotes “curly” ‘single’",
] * 20

TEXTS = [
    "", "a", "Hello world", "   ", "\n", "  leading spaces", "trailing spaces   ",
    "multiple    inner   spaces", "line one\nline two", "tabs\tand\nnewlines\r\n",
    "café naïve résumé", "Ångström Øresund", "caf\u0065\u0301 with a combining accent",
    "Ünïcödé ß ẞ ﬁ ligature", "full-width ＡＢＣ１２３", "東京は日本の首都です。", "中文 和 English 混合",
    "emoji 😀🎉 party", "😀", "👍🏽 thumbs", "digits 1234567890 3.14159", "...",
    "punctuation!?.,;:'\"()[]{}", "don't stop — it's fine…", " . , ! ?", "quotes “curly” ‘single’",
    "$100 & 50% off #hashtag", "email@example.com http://x.y/z?q=1", "Ελληνικά κείμενο",
    "Русский текст", "العربية", "mixed CASE Words", "non-breaking\u00a0space", "ideographic\u3000space",
    "zero\u200bwidth", "windows\r\nline end",
    f"Reverse the sequence. {SEP} 3 1 4", SEP, f"a{SEP}b", f"Define the word. {SEP} policy",
    "<extra_id_0>", "The <extra_id_0> walks in <extra_id_1> park", "x<extra_id_1>y",
    "<extra_id_99> at the end", "<extra_id_100> and <extra_id_01> are plain text",
    "</s> inside text", "<pad> <unk> <s> <mask>", "a <mask> b", "a<mask>b",
    "translate English to German: That is good.", "question: what is 2+2? answer: 4",
    "very long " * 20,
]


def train_t5_spiece():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=300, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def train_bart_bpe():
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return bpe


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """name -> (checkpoint directory, Hugging Face tokenizer of it)."""
    root = tmp_path_factory.mktemp("checkpoints")
    t5 = root / "t5"                                 # a T5 hub directory: spiece.model + configs
    t5.mkdir()
    (t5 / "spiece.model").write_bytes(train_t5_spiece())
    (t5 / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100}))
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "decoder_start_token_id": 0}))
    bart_files = root / "bart_files"                 # vocab.json + merges.txt only
    bart_files.mkdir()
    train_bart_bpe().save_model(str(bart_files))
    hf_files = transformers.BartTokenizer.from_pretrained(bart_files)
    bart_json = root / "bart_json"                   # tokenizer.json, <mask> lstrip as in BART's
    transformers.BartTokenizer.from_pretrained(bart_files, mask_token=transformers.AddedToken(
        "<mask>", lstrip=True, rstrip=False)).save_pretrained(bart_json)
    (bart_json / "config.json").write_text(json.dumps({"model_type": "bart", "decoder_start_token_id": 2}))
    return {"t5": (t5, transformers.T5Tokenizer.from_pretrained(t5)),
            "bart_files": (bart_files, hf_files),
            "bart_json": (bart_json, transformers.BartTokenizer.from_pretrained(bart_json))}


KINDS = ["t5", "bart_files", "bart_json"]


def mismatches(texts, ours, theirs):
    return [(t, a, b) for t in texts if (a := ours(t)) != (b := theirs(t))]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_equals_hugging_face(dirs, kind):
    directory, hf = dirs[kind]
    tok = load_tokenizer(directory)
    assert mismatches(TEXTS, tok.encode, lambda t: hf(t, add_special_tokens=False)["input_ids"]) == []
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_source_equals_hugging_face(dirs, kind):
    directory, hf = dirs[kind]
    tok = load_tokenizer(directory)
    assert mismatches(TEXTS, tok.encode_source, lambda t: hf(t)["input_ids"]) == []
    assert tok.encode_source_batch(TEXTS) == [tok.encode_source(t) for t in TEXTS]


@pytest.mark.parametrize("kind", KINDS)
def test_decode_equals_hugging_face(dirs, kind):
    directory, hf = dirs[kind]
    tok = load_tokenizer(directory)
    skip = lambda ids: hf.decode(ids, skip_special_tokens=True)  # noqa: E731
    # HF skips an eos and goes on where polytask stops (tested below): rows with an eos before
    # their end ("</s> inside text") are left out here
    rows = [r for t in TEXTS if tok.eos_id not in (r := hf(t)["input_ids"])[:-1]]
    assert len(rows) == len(TEXTS) - 1 >= 50
    # and random rows over the whole vocabulary: specials, sentinels, unk, no eos
    rng = random.Random(0)
    rows += [[rng.choice([i for i in range(tok.vocab_size) if i != tok.eos_id])
              for _ in range(rng.randint(1, 12))] for _ in range(50)]
    assert [(r, a, b) for r in rows if (a := tok.decode(r)) != (b := skip(r))] == []
    assert tok.decode_batch(rows) == [skip(r) for r in rows]


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_and_vocab_size_equal_hugging_face(dirs, kind):
    directory, hf = dirs[kind]
    tok = load_tokenizer(directory)
    assert isinstance(tok, TextTokenizer)
    assert tok.vocab_size == len(hf)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id)
    if kind == "t5":
        assert isinstance(tok, T5SentencePiece) and (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 0)
        assert [tok.sentinel_id(i) for i in (0, 1, 99)] == hf.convert_tokens_to_ids(
            ["<extra_id_0>", "<extra_id_1>", "<extra_id_99>"])
        assert tok.sentinel_id(0) == tok.vocab_size - 1
        with pytest.raises(ValueError, match="sentinel 100 out of range"):
            tok.sentinel_id(100)
    else:
        assert isinstance(tok, BartBPE) and (tok.pad_id, tok.eos_id, tok.bos_id) == (1, 2, 2)
        assert (tok.sos_id, tok.mask_id) == (hf.bos_token_id, hf.mask_token_id) == (0, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_sep_is_plain_text(dirs, kind):
    """polytask's "[SEP]" is no piece of a pretrained vocabulary: several ordinary tokens."""
    directory, hf = dirs[kind]
    tok = load_tokenizer(directory)
    ids = tok.encode(SEP)
    assert ids == hf(SEP, add_special_tokens=False)["input_ids"] and len(ids) > 1
    assert tok.decode(ids) == SEP and not set(ids) & {tok.pad_id, tok.eos_id, tok.unk_id}


@pytest.mark.parametrize("kind", KINDS)
def test_decode_stops_at_eos_and_skips_unproducible_ids(dirs, kind):
    directory, hf = dirs[kind]
    tok = load_tokenizer(directory)
    ids = tok.encode("the lazy dog")
    assert tok.decode([*ids, tok.eos_id, *tok.encode("fox")]) == "the lazy dog"
    # a leading decoder start is skipped first (BART's is its eos), as in a Hugging Face
    # generate() row: [start, (<s>,) ..., eos, pad]
    row = torch.tensor([tok.bos_id, *ids, tok.eos_id, tok.pad_id])
    assert tok.decode(row) == hf.decode(row, skip_special_tokens=True) == "the lazy dog"
    # a model's vocabulary may have rows the tokenizer never produces (T5: 32128 > 32100)
    beyond = [*ids, tok.vocab_size, tok.vocab_size + 27]
    assert tok.decode(beyond) == hf.decode(beyond, skip_special_tokens=True) == "the lazy dog"
    rows = torch.tensor([[*ids, tok.eos_id], [*ids, tok.pad_id]])
    assert tok.decode_batch(rows) == ["the lazy dog", "the lazy dog"]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_and_hugging_face_reads_it(dirs, kind, tmp_path):
    directory, _ = dirs[kind]
    tok = load_tokenizer(directory)
    tok.save(tmp_path / "tokenizer")
    again = load_tokenizer(tmp_path / "tokenizer")
    assert type(again) is type(tok)
    assert [again.encode_source(t) for t in TEXTS] == [tok.encode_source(t) for t in TEXTS]
    assert (again.vocab_size, again.pad_id, again.eos_id, again.bos_id) == (
        tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id)
    hf_class = transformers.T5Tokenizer if kind == "t5" else transformers.BartTokenizer
    hf = hf_class.from_pretrained(tmp_path / "tokenizer")
    assert mismatches(TEXTS, tok.encode_source, lambda t: hf(t)["input_ids"]) == []


def test_t5_extra_ids_from_configs_and_default(dirs, tmp_path):
    spiece = (dirs["t5"][0] / "spiece.model").read_bytes()
    pieces = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    (tmp_path / "spiece.model").write_bytes(spiece)
    assert load_tokenizer(tmp_path).vocab_size == pieces + 100          # no config: 100
    sentinels = [{"content": f"<extra_id_{i}>", "lstrip": True} for i in range(7)]
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": sentinels}))
    tok = load_tokenizer(tmp_path)                                       # counted from the list
    assert tok.vocab_size == pieces + 7 and tok.encode("<extra_id_6>") == [pieces]
    assert tok.encode("<extra_id_7>") == transformers.T5Tokenizer.from_pretrained(
        tmp_path, extra_ids=7)("<extra_id_7>", add_special_tokens=False)["input_ids"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 5}))
    with pytest.raises(ValueError, match="extra_ids is 5 but the configs list 7 sentinels"):
        load_tokenizer(tmp_path)


def test_bart_mask_options_from_special_tokens_map(dirs, tmp_path):
    """Without tokenizer.json, ``<mask>``'s lstrip comes from the configs, as Hugging Face reads it."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((dirs["bart_files"][0] / name).read_bytes())
    mask = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"mask_token": mask}))
    tok, hf = load_tokenizer(tmp_path), transformers.BartTokenizer.from_pretrained(tmp_path)
    assert mismatches(TEXTS, tok.encode, lambda t: hf(t, add_special_tokens=False)["input_ids"]) == []
    assert tok.encode(" a <mask>") == tok.encode(" a") + [tok.mask_id] != load_tokenizer(
        dirs["bart_files"][0]).encode(" a <mask>")


def test_decoder_start_from_config_json(dirs, tmp_path):
    tok = load_tokenizer(dirs["bart_json"][0])
    tok.save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"decoder_start_token_id": 0}))
    assert load_tokenizer(tmp_path).bos_id == 0
    (tmp_path / "config.json").write_text(json.dumps({"decoder_start_token_id": 10**6}))
    with pytest.raises(ValueError, match=r"decoder_start_token_id 1000000 is not an id of the "
                                         r"tokenizer \(0\.\.399\)"):
        load_tokenizer(tmp_path)


def test_refusals(dirs, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no tokenizer found; looked for spiece.model "
                                         r"\(T5\), tokenizer.json or vocab.json \+ merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")                           # merges.txt missing
    with pytest.raises(ValueError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    # polytask's own sentencepiece layout is not T5's
    own = tmp_path / "own"
    own.mkdir()
    Tokenizer.train(CORPUS, vocab_size=200, hard_vocab_limit=False).save(own / "spiece.model")
    with pytest.raises(ValueError, match=r"spiece.model: sentencepiece model has pad 0, eos 3, unk 1, "
                                         r"bos 2; T5's layout is pad 0, eos 1, unk 2, bos -1"):
        load_tokenizer(own)
    # transformers 5 saves a T5 tokenizer as a Unigram tokenizer.json, without spiece.model
    unigram = tmp_path / "unigram"
    dirs["t5"][1].save_pretrained(unigram)
    assert not (unigram / "spiece.model").exists()
    with pytest.raises(ValueError, match="tokenizer.json holds a Unigram model, not BART's"):
        load_tokenizer(unigram)
    # a byte-level BPE without BART's special ids
    plain = tmp_path / "plain"
    plain.mkdir()
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, show_progress=False, special_tokens=["<pad>", "<s>"])
    bpe.save_model(str(plain))
    with pytest.raises(ValueError, match=r"byte-level BPE has <s> 1, <pad> 0, </s> None, <unk> None, "
                                         r"<mask> None; BART's layout is <s> 0, <pad> 1, </s> 2, <unk> 3"):
        load_tokenizer(plain)


def test_collate_frames_sources_with_encode_source(dirs):
    rows = [Example("copy", f"Copy the sequence. {SEP} 3 1 4", "3 1 4"),
            Example("copy", "summarize: the cat sat", "cat")]
    for kind in KINDS:
        tok = load_tokenizer(dirs[kind][0])
        batch = collate(rows, tok, {"copy": 0}, max_source_len=64, max_target_len=16)
        for i, row in enumerate(rows):
            src = tok.encode_source(row.source)
            assert batch.src[i, :len(src)].tolist() == src and int(batch.src_mask[i].sum()) == len(src)
            y = tok.encode(row.target)
            assert batch.tgt_in[i, :len(y) + 1].tolist() == [tok.bos_id, *y]
            assert batch.labels[i, :len(y) + 1].tolist() == [*y, tok.eos_id]


def test_polytask_tokenizer_follows_the_interface():
    tok = Tokenizer.train(CORPUS, vocab_size=200, hard_vocab_limit=False)
    assert isinstance(tok, TextTokenizer)
    assert tok.encode_source(CORPUS[2]) == tok.encode(CORPUS[2])        # no eos: numbers unchanged
    assert tok.encode_source_batch(CORPUS[:3]) == tok.encode_batch(CORPUS[:3])

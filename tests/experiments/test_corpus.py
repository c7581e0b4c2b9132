"""The shipped pretraining corpus: integrity, format, size, disjointness from held-out data.

Disjointness is checked by reading the shipped task files, so it runs without WordNet:
- no validation/test target of three or more words, of ANY built-in task, occurs in the corpus
  (substring of the normalised text), and no wn_define / wn_reverse held-out gloss occurs;
- single-word targets ("vote", "odd", "7", "noun") cannot be kept out of English text: a corpus
  without them would not be English, and seeing a word is not knowing the answer. What would
  leak their answer is the pairing, so the checks are on pairs: no document is headed by a
  held-out wn_pos / wn_lexname word (its gloss gives away its part of speech and field), no
  document headed by a held-out wn_hypernym / wn_antonym input names its target, and the gloss
  that defines a held-out wn_reverse target occurs nowhere (checked with the glosses above).
Each checker is also run on a doctored corpus, to show it can fail.
"""
import gzip
import re
import shutil
from pathlib import Path

import pytest

from polytask.core.data.task_data import read_records
from polytask.experiments.suite import build_corpus
from polytask.experiments.suite.build_corpus import held_out_rows
from polytask.experiments.suite.corpus import (CORPUS_DIR, CORPUS_FILES, corpus_path, corpus_stats,
                                               iter_documents, normalise, read_checksums, sha256)
from polytask.experiments.suite.catalog import TASKS
from polytask.experiments.suite.writer import DATA_DIR, split_path

WORDNET = Path("/usr/share/wordnet")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(iter_documents())


@pytest.fixture(scope="module")
def held() -> dict[str, list[dict]]:
    return held_out_rows()


def headwords(doc: str) -> set[str]:
    return {w.strip().lower() for w in doc.split(": ", 1)[0].split(", ")}


def text_leaks(docs: list[str], held: dict[str, list[dict]]) -> list[str]:
    """Held-out long targets and glosses found in the corpus, as 'task: text'."""
    needles = [(f"{task}: {r['output']}", normalise(r["output"])) for task, rows in held.items()
               for r in rows if len(normalise(r["output"]).split()) >= 3]
    needles += [(f"wn_reverse: {r['input']}", normalise(r["input"])) for r in held["wn_reverse"]]
    joined = "\n".join(normalise(d) for d in docs)
    hits = {n for n in {n for _, n in needles} if n in joined}  # each text searched once
    return [name for name, n in needles if n in hits]


def pair_leaks(docs: list[str], held: dict[str, list[dict]]) -> list[str]:
    """Documents that pair a held-out single word with what gives its answer away."""
    heads = [(headwords(d), f" {normalise(d)} ") for d in docs]
    found = []
    for task in ("wn_pos", "wn_lexname"):
        words = {r["input"] for r in held[task]}
        found += [f"{task}: {sorted(h & words)}" for h, _ in heads if h & words]
    for task in ("wn_hypernym", "wn_antonym"):
        pairs = {(r["input"], f" {normalise(r['output'])} ") for r in held[task]}
        found += [f"{task}: {w} -> {t.strip()}" for h, text in heads for w, t in pairs
                  if w in h and t in text]
    return found


def test_files_checksums_and_licence():
    assert (CORPUS_DIR / "LICENSE").read_bytes() == (DATA_DIR / "WORDNET_LICENSE").read_bytes()
    sums = read_checksums()
    assert sorted(sums) == sorted(CORPUS_FILES)
    for name in CORPUS_FILES:
        assert sha256(corpus_path(name)) == sums[name], f"{name} differs from SHA256SUMS"


def test_gzip_header_is_reproducible():
    head = corpus_path().read_bytes()[:10]
    assert head[:3] == b"\x1f\x8b\x08"
    assert head[3] & 0x08 == 0, "gzip header stores a file name"
    assert head[4:8] == b"\0\0\0\0", "gzip header stores a timestamp"


def test_streaming_format():
    text = gzip.decompress(corpus_path().read_bytes()).decode("utf-8")  # strict UTF-8
    assert text.endswith("\n") and "\r" not in text and "\n\n" not in text
    for n, line in enumerate(text.split("\n")[:-1], start=1):
        head, sep, body = line.partition(": ")
        assert sep and head.strip() and body.strip() and line == line.strip(), f"line {n}: {line!r}"


def test_stats_match_an_independent_count_and_size_is_a_few_mb():
    raw = gzip.decompress(corpus_path().read_bytes())
    stats = corpus_stats()
    assert stats.documents == raw.count(b"\n") and stats.words == len(raw.split())
    assert stats.bytes == len(raw) and stats.compressed_bytes == corpus_path().stat().st_size
    assert 3_000_000 <= stats.bytes <= 8_000_000 and stats.documents >= 20_000


def test_no_held_out_long_target_or_gloss_occurs(docs, held):
    assert sum(len(r) for r in held.values()) >= 12 * 400  # every task's two held-out splits
    assert text_leaks(docs, held) == []


def test_no_held_out_word_is_paired_with_its_answer(docs, held):
    assert pair_leaks(docs, held) == []


def test_leak_checks_can_fail(docs, held):
    define, hyper, antonym = held["wn_define"][0], held["wn_hypernym"][0], held["wn_antonym"][0]
    long_target = next(r for r in held["sort"] if len(r["output"].split()) >= 3)["output"]
    doctored = docs[:200] + [
        f"{define['input']}: {define['output'].upper()}!",          # a gloss, case and punctuation
        f"shuffled digits: for example {long_target.replace(' ', ', ')}.",
        f"{held['wn_pos'][0]['input'].capitalize()}: something.",
        f"{held['wn_lexname'][0]['input']}, other: something.",
        f"{hyper['input']}: a {hyper['output']} of some kind.",
        f"{antonym['input']}: not {antonym['output']}."]
    assert text_leaks(docs[:200], held) == pair_leaks(docs[:200], held) == []
    found = text_leaks(doctored, held)
    assert {f"wn_define: {define['output']}", f"wn_reverse: {define['output']}",
            f"sort: {long_target}"} <= set(found)
    found = {leak.split(":")[0] for leak in pair_leaks(doctored, held)}
    assert found == {"wn_pos", "wn_lexname", "wn_hypernym", "wn_antonym"}


def test_document_format():
    assert build_corpus.document(["dog", "domestic dog"], 'a member of the genus Canis; '
                                 '"the dog barked all night"') == (
        'dog, domestic dog: a member of the genus Canis. For example: "the dog barked all night".')
    assert build_corpus.document(["x"], "drugs and medicines,  ") == "x: drugs and medicines."
    assert build_corpus.document(["y"], 'why?; "one"; "two"--Author') == (
        'y: why? For example: "one"; "two"--Author.')


def test_containing_and_mentions():
    docs = {("n", "1"): "a: The Young Person.", ("n", "2"): "b: youngster", ("v", "3"): "c: x"}
    assert build_corpus.containing(docs, {"young person", "x"}) == {("n", "1"), ("v", "3")}
    assert build_corpus.containing(docs, {"nothing here"}) == set()
    assert build_corpus.mentions("glazed: not un-glazed", "un glazed")
    assert not build_corpus.mentions("unglazed: clay", "glazed")


def test_excluded_synsets_on_a_small_wordnet():
    def synset(words, gloss, pointers=()):
        return {"words": words, "gloss": gloss, "pointers": list(pointers)}

    index = {"n": {"dog": (1, ["1", "5"]), "canine": (1, ["2"])}, "v": {"bark": (1, ["6"])},
             "a": {"hot": (1, ["3"]), "cold": (1, ["4"])}, "r": {}}
    data = {"n": {"1": synset(["dog"], "a domestic canine"), "2": synset(["canine"], "a carnivore"),
                  "5": synset(["dog"], "a worthless man")},
            "v": {"6": synset(["bark"], "make a noise")},
            "a": {"3": synset(["hot"], "of high temperature", [("!", "4", "a", 1, 1)]),
                  "4": synset(["cold"], "of low temperature", [("!", "3", "a", 1, 1)])}}
    held = {"wn_define": [{"input": "canine", "output": "a carnivore"}],
            "wn_reverse": [{"input": "a carnivore", "output": "canine"}],
            "wn_pos": [{"input": "bark", "output": "verb"}], "wn_lexname": [],
            "wn_hypernym": [{"input": "dog", "output": "canine"}],
            "wn_antonym": [{"input": "hot", "output": "cold"}]}
    docs = {(p, o): build_corpus.document(s["words"], s["gloss"])
            for p in data for o, s in data[p].items()}
    assert build_corpus.excluded_synsets(held, index, data, docs) == {
        ("n", "2"): "wn_define/wn_reverse", ("v", "6"): "wn_pos", ("n", "1"): "wn_hypernym",
        ("a", "3"): "wn_antonym", ("a", "4"): "wn_antonym"}  # "dog: a worthless man" stays
    held["wn_hypernym"] = [{"input": "bark", "output": "noise"}]
    with pytest.raises(ValueError, match="wn_hypernym: held-out word 'bark' is not a WordNet noun"):
        build_corpus.excluded_synsets(held, index, data, docs)


def test_user_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus file 'x.gz'; known files: wordnet_gl"):
        corpus_path("x.gz")
    (tmp_path / "SHA256SUMS").write_text("abc  file\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'SHA256SUMS'}:1: expected")):
        read_checksums(tmp_path)
    with pytest.raises(ValueError, match="data.noun not found; install Debian's wordnet-base"):
        build_corpus.build(tmp_path, out=tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(),
                    reason="wordnet-base not installed (/usr/share/wordnet/data.noun missing); "
                           "the SHA256SUMS check above still runs")
def test_corpus_regenerates_byte_for_byte(tmp_path):
    report = build_corpus.build(WORDNET, out=tmp_path)
    assert report["documents"] == corpus_stats().documents
    for name in (*CORPUS_FILES, "SHA256SUMS", "LICENSE"):
        assert (tmp_path / name).read_bytes() == (CORPUS_DIR / name).read_bytes(), name
    shutil.rmtree(tmp_path)


def test_docs_give_the_shipped_size():
    stats = corpus_stats()
    text = (Path(__file__).resolve().parents[2] / "docs" / "tasks.md").read_text()
    section = text[text.index("## Pretraining corpus"):]
    for n in (stats.documents, stats.words, stats.bytes, stats.compressed_bytes):
        assert f"{n:,}" in section, f"docs/tasks.md: corpus size {n:,} missing; update the section"


def test_every_task_character_occurs_in_the_corpus(docs):
    """The pretraining tokenizer learns its alphabet here; an unseen character becomes unk.
    ``{`` and ``}`` only appear in the ``{options}`` placeholder, replaced before tokenizing."""
    seen = set("".join(docs))
    used = set()
    for name, info in TASKS.items():
        used |= set("".join(info.templates).replace("{options}", ""))
        used |= set("".join(info.labels or ()))
        for split in ("train", "validation", "test"):
            for _, r in read_records(split_path(info.source, name, split)):
                used |= set(r["instruction"] + r["input"] + r["output"])
    assert used - seen == set()
    assert set("0123456789+") <= seen

"""polytask.core.data.stream: txt / jsonl / .gz documents, chunking, shuffling, exact resume,
the validation split, and one-line errors naming file:line."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from polytask.core.data.stream import TextStream, iter_documents

EOS = 0


def encode(text: str) -> list[int]:
    """Documents are lines of integers, so every token says which document it came from."""
    return [int(w) for w in text.split()]


def doc(i: int) -> str:
    return " ".join([str(i)] * (1 + i % 5))          # 1 to 5 tokens


def write(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def jsonl(docs: list[str]) -> list[str]:
    return [json.dumps({"id": n, "text": d}) for n, d in enumerate(docs)]


@pytest.fixture
def files(tmp_path):
    """Documents 1..60 over three files of three formats, with blank lines between."""
    a = write(tmp_path / "a.txt", [doc(i) if i % 7 else "" for i in range(1, 21)])
    b = write(tmp_path / "b.jsonl.gz", jsonl([doc(i) for i in range(21, 41)]) + [""])
    c = write(tmp_path / "c.txt.gz", [doc(i) for i in range(41, 61)])
    expected = [i for i in range(1, 61) if i > 20 or i % 7]
    return [a, b, c], expected


def stream(paths, **kw):
    kw = {"eos_id": EOS, "chunk_tokens": 4, "shuffle_buffer": 1, **kw}
    return TextStream(paths, encode, **kw)


def flat(docs):
    return [t for i in docs for t in encode(doc(i)) + [EOS]]


def test_iter_documents_reads_txt_jsonl_and_gz(files):
    paths, expected = files
    found = list(iter_documents(paths))
    assert [int(text.split()[0]) for _, _, text in found] == expected
    assert found[0] == (str(paths[0]), 1, doc(1)) and found[6] == (str(paths[0]), 8, doc(8))
    assert found[18][:2] == (str(paths[1]), 1)


def test_one_pass_is_the_documents_joined_with_eos(files):
    paths, expected = files
    train = list(stream(paths, repeat=False, validation_every=10**9))   # all but document 0
    tokens = flat(expected[1:])
    assert all(len(c) == 4 for c in train) and len(tokens) % 4      # the remainder is dropped
    assert [t for c in train for t in c] == tokens[:len(tokens) // 4 * 4]
    val = list(stream(paths, repeat=False, split="validation", validation_every=10**9,
                      chunk_tokens=3))
    assert val == [flat(expected[:1])]


def test_formats_give_the_same_chunks(tmp_path):
    docs = [doc(i) for i in range(1, 30)]
    variants = [write(tmp_path / "d.txt", docs), write(tmp_path / "d.txt.gz", docs),
                write(tmp_path / "d.jsonl", jsonl(docs)),
                write(tmp_path / "d.jsonl.gz", jsonl(docs))]
    runs = [list(stream([p], repeat=False, chunk_tokens=3)) for p in variants]
    assert runs[0] and all(r == runs[0] for r in runs)


def test_shuffle_buffer_permutes_chunks_by_seed(files):
    paths, _ = files
    plain = list(stream(paths, repeat=False))
    shuffled = list(stream(paths, repeat=False, shuffle_buffer=8, seed=1))
    assert Counter(map(tuple, shuffled)) == Counter(map(tuple, plain)) and shuffled != plain
    assert shuffled == list(stream(paths, repeat=False, shuffle_buffer=8, seed=1))
    assert shuffled != list(stream(paths, repeat=False, shuffle_buffer=8, seed=2))


def test_repeats_forever_in_epochs(files):
    paths, _ = files
    one_pass = list(stream(paths, repeat=False, chunk_tokens=5))
    s = stream(paths, chunk_tokens=5)
    taken = list(islice(s, 3 * len(one_pass)))
    assert len(taken) == 3 * len(one_pass) and s.epoch >= 2
    assert taken[:len(one_pass)] == one_pass


@pytest.mark.parametrize("n", [0, 1, 9, 37, 80])
def test_resume_continues_with_exactly_the_same_chunks(files, n):
    paths, _ = files
    kw = dict(chunk_tokens=7, shuffle_buffer=5, seed=3)
    original = stream(paths, **kw)
    list(islice(original, n))
    state = json.loads(json.dumps(original.state_dict()))          # through JSON, as saved
    expected = list(islice(original, 60))                          # crosses epoch borders
    restored = stream(paths, **kw)
    list(islice(restored, 5))                                      # a used stream is overwritten
    restored.load_state_dict(state)
    assert list(islice(restored, 60)) == expected


def test_resume_refuses_another_streams_state(files, tmp_path):
    paths, _ = files
    state = stream(paths).state_dict()
    with pytest.raises(ValueError, match="split 'train' does not match"):
        stream(paths, split="validation").load_state_dict(state)


@pytest.mark.parametrize("every", [2, 3, 10])
def test_validation_and_train_are_disjoint_and_cover_all_documents(files, every):
    paths, expected = files
    seen = {}
    for split in ("train", "validation"):
        s = stream(paths, split=split, validation_every=every, repeat=False, chunk_tokens=1)
        seen[split] = [t for c in s for t in c if t != EOS]
        seen[split] = list(dict.fromkeys(seen[split]))              # document ids in order
    assert not set(seen["train"]) & set(seen["validation"])
    assert sorted(seen["train"] + seen["validation"]) == expected
    assert seen["validation"] == expected[::every]                  # by document index


def test_split_is_the_same_in_every_epoch(files):
    paths, expected = files                       # 58 documents: not a multiple of 3
    for split in ("train", "validation"):
        kw = dict(split=split, validation_every=3, chunk_tokens=1)
        one_pass = list(stream(paths, repeat=False, **kw))
        assert list(islice(stream(paths, **kw), 3 * len(one_pass))) == 3 * one_pass


def test_files_are_read_lazily(tmp_path):
    # the bad line comes late: chunks before it come out, the error when it is reached
    path = write(tmp_path / "late.jsonl", jsonl([doc(i) for i in range(1, 40)]) + ["{oops"])
    s = stream([path], chunk_tokens=2)
    assert len(list(islice(s, 10))) == 10
    with pytest.raises(ValueError, match=r"late.jsonl:40: invalid JSON"):
        list(islice(s, 1000))


BAD = [  # (file name, raw lines, message pattern naming file:line)
    ("bad.txt", [b"1 2", b"3 \xff 4"], r"bad\.txt:2: invalid UTF-8"),
    ("bad.txt.gz", [b"1", b"", b"\xc3("], r"bad\.txt\.gz:3: invalid UTF-8"),
    ("bad.jsonl", [b'{"text": "1"}', b'{"text": 1 2}'], r"bad\.jsonl:2: invalid JSON"),
    ("bad.jsonl", [b'["1"]'], r"bad\.jsonl:1: expected a JSON object"),
    ("bad.jsonl", [b'{"text": "1"}', b'{"body": "2"}'],
     r"bad\.jsonl:2: no 'text' key \(keys: body"),
    ("bad.jsonl", [b'{"text": 12}'], r"bad\.jsonl:1: 'text' is a int, expected a string"),
    ("bad.jsonl", [b'{"text": null}'], r"bad\.jsonl:1: 'text' is a NoneType"),
]


@pytest.mark.parametrize("name,lines,match", BAD, ids=[b[2].split(":")[1] for b in BAD])
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path, name, lines, match):
    data = b"".join(line + b"\n" for line in lines)
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    for run in (lambda: list(iter_documents([path])),
                lambda: list(stream([path], repeat=False, validation_every=10**9))):
        with pytest.raises(ValueError, match=match) as err:
            run()
        assert "\n" not in str(err.value)


def test_damaged_gz_is_a_one_line_error(tmp_path):
    good = gzip.compress(b"1 2\n3 4\n" * 2000)
    for name, data, match in [("plain.txt.gz", b"1 2\n", r"plain\.txt\.gz:1: cannot read"),
                              ("cut.txt.gz", good[:len(good) // 2], r"cut\.txt\.gz:\d+: cannot")]:
        path = tmp_path / name
        path.write_bytes(data)
        for run in (lambda: list(iter_documents([path])),
                    lambda: list(stream([path], repeat=False))):
            with pytest.raises(ValueError, match=match) as err:
                run()
            assert "\n" not in str(err.value)


def test_missing_file_and_no_documents(tmp_path):
    missing = tmp_path / "nope.txt"
    for run in (lambda: list(iter_documents([missing])), lambda: stream([missing])):
        with pytest.raises(ValueError, match=r"nope\.txt: file not found"):
            run()
    blank = write(tmp_path / "blank.txt", ["", "  ", ""])
    with pytest.raises(ValueError, match=r"blank\.txt: no documents for the 'train' split"):
        next(stream([blank]))
    one = write(tmp_path / "one.txt", ["5 5"])                     # all of it is validation
    with pytest.raises(ValueError, match="no documents for the 'train' split .1 documents"):
        next(stream([one]))
    assert next(stream([one], split="validation", chunk_tokens=3)) == [5, 5, EOS]


@pytest.mark.parametrize("kwargs,match", [({"split": "test"}, "split 'test' is not one of"),
                                          ({"chunk_tokens": 0}, r"chunk_tokens \(0\)"),
                                          ({"shuffle_buffer": 0}, r"shuffle_buffer \(0\)"),
                                          ({"validation_every": 1}, r"validation_every \(1\)")])
def test_bad_arguments(files, kwargs, match):
    with pytest.raises(ValueError, match=match):
        stream(files[0], **kwargs)

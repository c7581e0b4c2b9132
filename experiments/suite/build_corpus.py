"""Build the shipped pretraining corpus from WordNet 3.0's glosses (Miller 1995; Fellbaum 1998).

Reads Debian's ``wordnet-base`` files (as :mod:`polytask.experiments.suite.build_wordnet` does)
and the shipped validation and test splits of the built-in tasks, and writes
``experiments/suite/data/corpus/``: ``wordnet_glosses.txt.gz``, ``SHA256SUMS`` and ``LICENSE``
(WordNet's licence, copied from ``data/WORDNET_LICENSE``). The bytes are a deterministic
function of those inputs, so rebuilding reproduces the shipped file exactly.

    python -m polytask.experiments.suite.build_corpus [--wordnet /usr/share/wordnet]
        [--out experiments/suite/data/corpus]

Document format (one synset per line, chosen to read as an English dictionary entry)::

    <lemma>, <lemma>, ...: <definition>. For example: "<example>"; "<example>".

Lemmas keep WordNet's case, underscores become spaces; there is no part-of-speech label
(it would hand wn_pos its answers). Which synsets: every synset with a sense that is
sense-tagged in SemCor (the common senses) or with at least ``MIN_EXAMPLES`` usage examples
(the most sentence-like text): about 31,000 of WordNet's 117,659, 3.4 MB raw and 1.3 MB gzipped.
(One example would be 45,000 synsets, 1.9 MB gzipped, more than the 2 MB that the whole
shipped ``data`` directory may hold, a limit checked by ``tests/experiments/test_suite.py``.)
Documents are shuffled with seed 0 so that a stream does not see one topic at a time.

Left out, so that no validation or test example of a built-in task is answered by the corpus:
    wn_define, wn_reverse  the synset whose definition is a held-out gloss (the gloss is the
                           wn_define target and the wn_reverse input next to its answer);
    wn_pos, wn_lexname     every synset of a held-out word: its gloss gives away the part of
                           speech (a verb gloss reads "to ...") and the semantic field;
    wn_hypernym            the first noun sense of a held-out word (its gloss usually starts
                           with the hypernym) and any synset of the word that names the target;
    wn_antonym             the synsets joined by the held-out antonym pointer and any synset
                           of either word that names the other ("unglazed: not glazed");
    every task             any document containing a held-out target of three or more words,
                           or a held-out gloss, as a substring of its normalised text.
"""
from __future__ import annotations

import argparse
import gzip
import random
import re
import shutil
from pathlib import Path

from polytask.core.data.task_data import read_records
from polytask.experiments.suite.build_wordnet import (POS_FILES, _lines, definition, read_data,
                                                      read_index)
from polytask.experiments.suite.catalog import TASKS
from polytask.experiments.suite.corpus import CHECKSUMS, CORPUS_DIR, CORPUS_FILES, normalise, sha256
from polytask.experiments.suite.writer import DATA_DIR, split_path

HELD_OUT = ("validation", "test")
MIN_EXAMPLES = 2  # synsets without a SemCor-tagged sense need this many usage examples
Key = tuple[str, str]  # (data file's part of speech n/v/a/r, synset offset)


def read_lemmas(root: Path, pos: str) -> dict[str, list[str]]:
    """offset -> the synset's lemmas as written (case kept, ``(a)``/``(p)`` markers dropped)."""
    out = {}
    for _, line in _lines(root / f"data.{POS_FILES[pos]}"):
        f = line.split(" ", 4)
        w_cnt = int(f[3], 16)
        words = line.partition(" | ")[0].split()[4:4 + 2 * w_cnt:2]
        out[f[0]] = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in words]
    return out


def document(lemmas: list[str], gloss: str) -> str:
    """One synset as an English sentence: lemmas, definition, then its quoted examples."""
    text = " ".join(definition(gloss).split()).rstrip(",;:").rstrip()
    if text and text[-1] not in ".?!":
        text += "."
    _, quote, tail = gloss.partition('"')
    examples = " ".join((quote + tail).split()).rstrip(";").strip()
    if examples:
        text += f" For example: {examples}" + ("" if examples[-1] in ".?!" else ".")
    return f"{', '.join(lemmas)}: {text}"


def n_examples(gloss: str) -> int:
    """How many quoted usage examples follow the definition in a gloss."""
    _, quote, tail = gloss.partition('"')
    return (quote + tail).count('"') // 2


def held_out_rows(tasks_dir: Path = DATA_DIR) -> dict[str, list[dict]]:
    """Validation and test records of every built-in task, read from the shipped files."""
    return {name: [r for split in HELD_OUT
                   for _, r in read_records(split_path(t.source, name, split, tasks_dir))]
            for name, t in TASKS.items()}


def banned_strings(held: dict[str, list[dict]]) -> set[str]:
    """Normalised held-out texts no document may contain: targets of three or more words
    (any task) and the glosses of wn_define / wn_reverse (targets and inputs)."""
    out = {normalise(r["output"]) for rows in held.values() for r in rows
           if len(normalise(r["output"]).split()) >= 3}
    out |= {normalise(r["output"]) for r in held["wn_define"]}
    return out | {normalise(r["input"]) for r in held["wn_reverse"]}


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words, after normalising both."""
    return f" {normalise(phrase)} " in f" {normalise(text)} "


def excluded_synsets(held: dict[str, list[dict]], index: dict[str, dict], data: dict[str, dict],
                     docs: dict[Key, str]) -> dict[Key, str]:
    """Synsets a held-out example reads or whose document names its answer -> the task.

    ``index`` and ``data`` are :func:`read_index` / :func:`read_data` per part of speech.
    """
    out: dict[Key, str] = {}

    def senses(word: str) -> list[Key]:
        return [(p, o) for p in POS_FILES if word in index[p] for o in index[p][word][1]]

    glosses = {r["output"] for r in held["wn_define"]} | {r["input"] for r in held["wn_reverse"]}
    for key, synset in ((k, data[k[0]][k[1]]) for k in docs):
        if definition(synset["gloss"]) in glosses:
            out[key] = "wn_define/wn_reverse"
    for task in ("wn_pos", "wn_lexname"):
        out.update((k, task) for r in held[task] for k in senses(r["input"]))
    for r in held["wn_hypernym"]:
        if r["input"] not in index["n"]:
            raise ValueError(f"wn_hypernym: held-out word {r['input']!r} is not a WordNet noun; "
                             "regenerate the tasks with build_wordnet from the same WordNet")
        out[("n", index["n"][r["input"]][1][0])] = "wn_hypernym"
    for task in ("wn_hypernym", "wn_antonym"):
        for r in held[task]:
            out.update((k, task) for k in senses(r["input"])
                       if k in docs and mentions(docs[k], r["output"]))
    for r in held["wn_antonym"]:
        for p, o in senses(r["input"]):
            for symbol, offset, tpos, src, tgt in data[p][o]["pointers"]:
                tpos = "a" if tpos == "s" else tpos
                if symbol == "!" and tgt and data[tpos][offset]["words"][tgt - 1] == r["output"]:
                    out[(p, o)] = out[(tpos, offset)] = "wn_antonym"
    return out


def containing(docs: dict[Key, str], needles: set[str]) -> set[Key]:
    """Keys of the documents whose normalised text contains any needle (one pass per needle)."""
    keys = list(docs)
    starts, text, pos = [], [], 0
    for k in keys:
        starts.append(pos)
        text.append(normalise(docs[k]))
        pos += len(text[-1]) + 1
    joined, hits = "\n".join(text), set()
    for needle in sorted(needles):
        i = joined.find(needle)
        while i >= 0:
            hits.add(keys[_bisect(starts, i)])
            i = joined.find(needle, i + 1)
    return hits


def _bisect(starts: list[int], i: int) -> int:
    lo, hi = 0, len(starts)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if starts[mid] <= i else (lo, mid)
    return lo


def write_corpus(docs: list[str], out: Path) -> Path:
    """Write the documents gzipped without timestamp or name, plus ``SHA256SUMS``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CORPUS_FILES[0]
    text = "".join(d + "\n" for d in docs).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=9) as f:
        f.write(text)
    (out / CHECKSUMS).write_text(f"{sha256(path)}  {path.name}\n", encoding="utf-8")
    return path


def build(root: Path, out: Path = CORPUS_DIR, tasks_dir: Path = DATA_DIR) -> dict[str, int]:
    """Build and write the corpus; returns how many synsets were kept and left out, by why."""
    if not (root / "data.noun").is_file():
        raise ValueError(f"{root / 'data.noun'} not found; "
                         "install Debian's wordnet-base or pass --wordnet")
    index = {p: read_index(root, p) for p in POS_FILES}
    data = {p: read_data(root, p) for p in POS_FILES}
    lemmas = {p: read_lemmas(root, p) for p in POS_FILES}
    tagged = {(p, o) for p in POS_FILES for n, offs in index[p].values() for o in offs[:n]}
    docs = {(p, o): document(lemmas[p][o], s["gloss"]) for p in POS_FILES
            for o, s in data[p].items()
            if (p, o) in tagged or n_examples(s["gloss"]) >= MIN_EXAMPLES}
    held = held_out_rows(tasks_dir)
    report = {"synsets": sum(len(d) for d in data.values()), "selected": len(docs)}
    for key, task in excluded_synsets(held, index, data, docs).items():
        if docs.pop(key, None) is not None:
            report[f"left out: {task}"] = report.get(f"left out: {task}", 0) + 1
    hits = containing(docs, banned_strings(held))
    report["left out: held-out text"] = len(hits)
    kept = [d for k, d in docs.items() if k not in hits]
    random.Random(0).shuffle(kept)
    write_corpus(kept, out)
    shutil.copyfile(tasks_dir / "WORDNET_LICENSE", out / "LICENSE")
    report["documents"] = len(kept)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"),
                        help="directory with WordNet 3.0's index.* and data.* files")
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="corpus directory")
    parser.add_argument("--tasks", type=Path, default=DATA_DIR,
                        help="built-in task data directory whose held-out splits are excluded")
    args = parser.parse_args(argv)
    for what, n in build(args.wordnet, args.out, args.tasks).items():
        print(f"{what}: {n}")


if __name__ == "__main__":
    main()

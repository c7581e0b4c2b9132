"""Derive the built-in WordNet tasks from Princeton WordNet 3.0 (Miller 1995; Fellbaum 1998).

Reads the database files of Debian's ``wordnet-base`` package (``index.<pos>`` and
``data.<pos>``, format in ``man 5 wndb``) and writes compact gzipped JSONL splits to
``experiments/suite/data/wordnet``, which are committed: users need neither this script nor
the package. The output is a deterministic function of the input files and ``--seed``.

    apt-get install -y wordnet-base
    python -m polytask.experiments.suite.build_wordnet [--wordnet /usr/share/wordnet] [--seed 0]
        [--train 3000] [--eval 300] [--out experiments/suite/data]

Tasks (words are single lower-case lemmas; "first sense" is WordNet's most frequent sense):
    wn_define    word -> definition of its first sense           (generation)
    wn_reverse   definition -> word: wn_define inverted, on the same splits (synonyms share a
                 gloss, so each gloss keeps only its most frequent word)
    wn_pos       word -> noun / verb / adjective / adverb, words with a single part of speech
    wn_lexname   word -> lexicographer file (45 classes, ``man 5 lexnames``), monosemous words
    wn_hypernym  noun -> first lemma of the first hypernym of its first sense
    wn_antonym   word -> its antonym (direct antonymy, pointer ``!``); both directions of a pair
                 always fall in the same split
Frequent words (by WordNet's sense-tagged counts) are preferred where there are more candidates
than needed. The WordNet licence (``data/WORDNET_LICENSE``) must stay with the data.
"""
from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict
from pathlib import Path

from polytask.experiments.suite.catalog import LEXNAMES, WN_INSTRUCTIONS as INSTRUCTIONS
from polytask.experiments.suite.writer import DATA_DIR, write_task

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
WORD = re.compile(r"^[a-z]{3,}$")


def _lines(path: Path):
    """Database lines with their numbers; the licence header lines start with spaces."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.startswith("  "):
                yield n, line.rstrip("\n")


def read_index(root: Path, pos: str) -> dict[str, tuple[int, list[str]]]:
    """lemma -> (sense-tagged count, synset offsets in sense order) for one part of speech."""
    out = {}
    for n, line in _lines(root / f"index.{POS_FILES[pos]}"):
        f = line.split()
        try:
            p_cnt = int(f[3])
            tagged = int(f[5 + p_cnt])
            offsets = f[6 + p_cnt:6 + p_cnt + int(f[2])]
        except (IndexError, ValueError):
            raise ValueError(f"{root}/index.{POS_FILES[pos]}:{n}: malformed index line") from None
        out[f[0]] = (tagged, offsets)
    return out


def read_data(root: Path, pos: str) -> dict[str, dict]:
    """offset -> synset {lexname, words, pointers [(symbol, offset, pos, src, tgt)], gloss}."""
    out = {}
    for n, line in _lines(root / f"data.{POS_FILES[pos]}"):
        head, _, gloss = line.partition(" | ")
        f = head.split()
        try:
            w_cnt = int(f[3], 16)
            words = [re.sub(r"\(.*\)$", "", w).lower() for w in f[4:4 + 2 * w_cnt:2]]
            i = 4 + 2 * w_cnt
            pointers = [(f[j], f[j + 1], f[j + 2], int(f[j + 3][:2], 16), int(f[j + 3][2:], 16))
                        for j in range(i + 1, i + 1 + 4 * int(f[i]), 4)]
            out[f[0]] = {"lexname": LEXNAMES[int(f[1])], "words": words, "pointers": pointers,
                         "gloss": gloss.strip()}
        except (IndexError, ValueError):
            raise ValueError(f"{root}/data.{POS_FILES[pos]}:{n}: malformed data line") from None
    return out


def definition(gloss: str) -> str:
    """The defining part of a gloss, without its quoted usage examples."""
    return gloss.split('"')[0].strip().rstrip(";").strip()


def _by_frequency(items: dict[str, int]) -> list[str]:
    return sorted(items, key=lambda k: (-items[k], k))


def derive(root: Path, seed: int, n_total: int) -> dict[str, tuple[list[dict], int | None]]:
    """Rows of every task (and the split seed, ``None`` when rows are pre-grouped)."""
    index = {p: read_index(root, p) for p in POS_FILES}
    data = {p: read_data(root, p) for p in POS_FILES}
    words = {w for p in index for w in index[p] if WORD.match(w)}
    rng = random.Random(seed)
    tasks: dict[str, tuple[list[dict], int | None]] = {}

    # define / reverse: a word's most frequent POS and that POS's first sense
    best = {}
    for w in words:
        tagged, pos = max((index[p][w][0], p) for p in index if w in index[p])
        gloss = definition(data[pos][index[pos][w][1][0]]["gloss"])
        if 3 <= len(gloss.split()) <= 20 and w not in gloss.split():
            best[w] = (tagged, gloss)
    by_gloss = {}  # synonyms share a gloss; keep its most frequent word so gloss -> word is a function
    for w in _by_frequency({w: t for w, (t, _) in best.items()}):
        by_gloss.setdefault(best[w][1], w)
    chosen = list(by_gloss.values())[:n_total]
    tasks["wn_define"] = ([{"input": w, "output": best[w][1]} for w in chosen], seed)
    tasks["wn_reverse"] = ([{"input": best[w][1], "output": w} for w in chosen], seed)

    # part of speech: words with exactly one POS, balanced over the four classes
    per_pos = defaultdict(list)
    for w in sorted(words):
        poses = [p for p in index if w in index[p]]
        if len(poses) == 1:
            per_pos[poses[0]].append(w)
    rows = []
    for p in POS_FILES:
        rows += [{"input": w, "output": POS_NAMES[p]} for w in rng.sample(per_pos[p], min(len(per_pos[p]), n_total // 4))]
    tasks["wn_pos"] = (rows, seed)

    # lexicographer category: monosemous words (one synset in all of WordNet), balanced
    per_lex = defaultdict(list)
    for w in sorted(words):
        senses = [(p, o) for p in index if w in index[p] for o in index[p][w][1]]
        if len(senses) == 1:
            per_lex[data[senses[0][0]][senses[0][1]]["lexname"]].append(w)
    cap = n_total // len(LEXNAMES) + 1
    tasks["wn_lexname"] = ([{"input": w, "output": lex} for lex in LEXNAMES
                            for w in rng.sample(per_lex[lex], min(cap, len(per_lex[lex])))], seed)

    # hypernym: frequent nouns -> first lemma of the first hypernym of the first sense
    hyper = {}
    for w in (w for w in words if w in index["n"]):
        pointers = [p for p in data["n"][index["n"][w][1][0]]["pointers"] if p[0] in ("@", "@i")]
        if pointers:
            target = data["n"][pointers[0][1]]["words"][0].replace("_", " ")
            if target != w:
                hyper[w] = target
    chosen = _by_frequency({w: index["n"][w][0] for w in hyper})[:n_total]
    tasks["wn_hypernym"] = ([{"input": w, "output": hyper[w]} for w in chosen], seed)

    # antonym: lexical "!" pointers between single words; a pair's two directions stay together
    pairs = set()
    for p in POS_FILES:
        for synset in data[p].values():
            for symbol, offset, tpos, src, tgt in synset["pointers"]:
                if symbol == "!" and src and tgt:
                    target = data["a" if tpos == "s" else tpos][offset]  # satellites live in data.adj
                    a, b = synset["words"][src - 1], target["words"][tgt - 1]
                    if WORD.match(a) and WORD.match(b) and a != b:
                        pairs.add(tuple(sorted((a, b))))
    first, antonym_rows = set(), []
    for a, b in rng.sample(sorted(pairs), len(pairs)):
        if a not in first and b not in first:  # one antonym per input word: a well-posed target
            first |= {a, b}
            antonym_rows += [{"input": a, "output": b}, {"input": b, "output": a}]
    tasks["wn_antonym"] = (antonym_rows[:n_total - n_total % 2], None)
    return tasks


def build(root: Path, seed: int = 0, train: int = 3000, eval: int = 300,
          out: Path = DATA_DIR) -> dict[str, dict[str, int]]:
    """Derive and write every WordNet task; returns the examples written per split."""
    for name in ("index.noun", "data.noun"):
        if not (root / name).is_file():
            raise ValueError(f"{root / name} not found; install Debian's wordnet-base or pass --wordnet")
    if eval % 2:
        raise ValueError(f"--eval ({eval}) must be even so antonym pairs are not split")
    sizes = {"train": train, "validation": eval, "test": eval}
    return {task: write_task("wordnet", task, INSTRUCTIONS[task], rows, sizes, split_seed, out)
            for task, (rows, split_seed) in derive(root, seed, sum(sizes.values())).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"),
                        help="directory with WordNet 3.0's index.* and data.* files")
    parser.add_argument("--seed", type=int, default=0, help="sampling and split seed")
    parser.add_argument("--train", type=int, default=3000, help="most training examples per task")
    parser.add_argument("--eval", type=int, default=300, help="validation and test examples (even)")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="data directory")
    args = parser.parse_args(argv)
    for task, counts in build(args.wordnet, args.seed, args.train, args.eval, args.out).items():
        print(task, counts)


if __name__ == "__main__":
    main()

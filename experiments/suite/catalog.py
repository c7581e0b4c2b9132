"""The built-in tasks (kind, labels, metric, group, templates, source) and the named suites.

Groups follow the understanding / generation split used for hierarchical sharing: the
classification tasks are "understanding", the text-producing ones "generation". Each task has
several instruction phrasings (FLAN, Wei et al. 2022); the first is the evaluation template
and matches the ``instruction`` stored in the data files.
"""
from __future__ import annotations

from dataclasses import dataclass

# The catalog imports neither build script, so ``python -m`` can run them cleanly.
LEXNAMES = (  # index = lex_filenum of WordNet's data files, from lexnames(5WN)
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
SYN_INSTRUCTIONS = {  # the first template of each task, also stored in its data files
    "copy": "Copy the sequence.", "reverse": "Reverse the sequence.",
    "sort": "Sort the digits in increasing order.", "addition": "Add the two numbers.",
    "parity": "Is the number of ones odd or even?", "majority": "Which bit is in the majority?",
}
WN_INSTRUCTIONS = {
    "wn_define": "Define the word.", "wn_reverse": "Which word has this meaning?",
    "wn_pos": "What part of speech is the word?",
    "wn_lexname": "What is the semantic category of the word?",
    "wn_hypernym": "Name a more general term for the word.",
    "wn_antonym": "Give the opposite of the word.",
}


@dataclass(frozen=True)
class TaskInfo:
    """Everything :func:`polytask.experiments.suite.load_suite` needs to build one ``TaskSpec``."""

    name: str
    source: str                    # data sub-directory: "synthetic" or "wordnet"
    kind: str
    templates: tuple[str, ...]
    metric: str
    labels: tuple[str, ...] | None = None
    description: str = ""

    @property
    def group(self) -> str:
        return "understanding" if self.kind == "classification" else "generation"


def _syn(name: str, more: tuple[str, ...], kind: str = "generation", labels=None, description=""):
    metric = "accuracy" if kind == "classification" else "exact_match"
    return TaskInfo(name, "synthetic", kind, (SYN_INSTRUCTIONS[name], *more), metric,
                    labels, description)


def _wn(name: str, more: tuple[str, ...], kind: str = "generation", labels=None,
        metric: str | None = None, description=""):
    metric = metric or ("accuracy" if kind == "classification" else "exact_match")
    return TaskInfo(name, "wordnet", kind, (WN_INSTRUCTIONS[name], *more), metric, labels,
                    description)


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    _syn("copy", ("Repeat the following digits.", "Write the same sequence again."),
         description="digit sequence -> itself"),
    _syn("reverse", ("Write the digits in reverse order.", "Read the sequence backwards."),
         description="digit sequence -> reversed"),
    _syn("sort", ("Put the digits in ascending order.", "Arrange the digits from smallest to largest."),
         description="digit sequence -> sorted"),
    _syn("addition", ("What is the sum?", "Compute the total of the two numbers."),
         description="two numbers of 1-3 digits -> their sum"),
    _syn("parity", ("Does the sequence contain an odd or even number of ones? Options: {options}",
                    "Count the ones: {options}?"), "classification", ("even", "odd"),
         description="bit string -> parity of the count of ones"),
    _syn("majority", ("Are there more ones or zeros? Answer {options}.",
                      "Which bit occurs most often? Options: {options}"),
         "classification", ("0", "1"), description="odd-length bit string -> majority bit"),
    _wn("wn_define", ("What does this word mean?", "Give a dictionary definition of the word."),
        metric="rouge_l", description="word -> gloss of its most frequent sense"),
    _wn("wn_reverse", ("Name the word defined here.", "Find the word for this definition."),
        description="gloss -> word (wn_define inverted, same splits)"),
    _wn("wn_pos", ("Is this word a {options}?", "Give the part of speech of the word."),
        "classification", ("noun", "verb", "adjective", "adverb"),
        description="word with one part of speech -> that part of speech"),
    _wn("wn_lexname", ("Which WordNet lexicographer file holds this word?",
                       "Classify the word into its semantic field."),
        "classification", tuple(LEXNAMES), description="monosemous word -> lexicographer file (45)"),
    _wn("wn_hypernym", ("What is this a kind of?", "Give a hypernym of the word."),
        description="noun -> first hypernym of its most frequent sense"),
    _wn("wn_antonym", ("What is the antonym of the word?", "Name a word with the opposite meaning."),
        description="word -> its direct antonym"),
)}

SYNTHETIC = ("copy", "reverse", "sort", "addition", "parity", "majority")
WORDNET = ("wn_define", "wn_reverse", "wn_pos", "wn_lexname", "wn_hypernym", "wn_antonym")

# suite name -> (tasks, held-out tasks). Held-out tasks are evaluated zero-shot (FLAN).
SUITES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # seconds-long tests: two related generation tasks and one classification task
    "tiny": (("copy", "reverse", "parity"), ()),
    "synthetic": (SYNTHETIC, ()),
    "wordnet": (WORDNET, ()),
    # the fuller sharing ablations: related pairs in each group
    "default": (("reverse", "sort", "parity", "wn_pos", "wn_lexname", "wn_antonym"), ()),
    # the README's main job: two generation and two classification tasks, learnable within
    # a few hundred steps, so four strategies fit in minutes on a 2-core CPU
    "quick": (("reverse", "sort", "majority", "wn_pos"), ()),
    # FLAN's protocol: train on some instructions, evaluate unseen ones zero-shot
    "heldout": (("copy", "reverse", "addition", "wn_define", "wn_hypernym", "wn_antonym",
                 "sort", "wn_reverse"), ("sort", "wn_reverse")),
}

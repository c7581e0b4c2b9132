"""Subword tokenizer: a thin wrapper over sentencepiece (Kudo & Richardson 2018).

Fixed special ids, matching ``ModelConfig`` defaults: pad = 0, unk = 1, bos = 2, eos = 3, and
the instruction separator ``[SEP]`` (``polytask.core.data.task_data.SEP``) is a user-defined piece with id 4, so it
is never split. Training happens in memory: the corpus is streamed to sentencepiece and the
model is written to a ``BytesIO``, so no temporary file is left behind.

Normalisation is ``identity`` (what you encode is what you decode) except that sentencepiece
collapses runs of whitespace and strips the ends. ``character_coverage`` is 1.0: every
character of the training corpus gets a piece; characters never seen in training map to unk.

Vocabulary size: ``vocab_size`` is a hard target, and a corpus too small for it is retrained
at the largest size sentencepiece says it supports, with one note on stderr (the default
``data.vocab_size`` of 1000 is more than a few hundred short examples hold);
``fit_vocab=False`` raises ``ValueError`` quoting sentencepiece's maximum instead.
``hard_vocab_limit=False`` lets sentencepiece build a smaller vocabulary its own way;
``Tokenizer.vocab_size`` reports the size actually built, which is what
``ModelConfig.vocab_size`` must be at least.

Sentinels for self-supervised pretraining (:mod:`polytask.core.data.noising`):
``train(..., sentinels=n)`` adds T5's pieces ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` as
user-defined pieces right after ``[SEP]`` (ids 5 ... 4 + n; every other special id is unchanged),
so they are never split; :attr:`Tokenizer.sentinel_ids` lists them, extra_id_0 first. T5 puts
them at the top of its vocabulary in decreasing order; only the names matter to the objective.
BART's single mask token is :attr:`Tokenizer.mask_id`, which reuses ``<extra_id_0>``: a model is
pretrained with one objective at a time, so the two never meet.

:class:`TextTokenizer` is the interface every tokenizer polytask trains or evaluates with
follows: this module's :class:`Tokenizer`, and a pretrained checkpoint's own
(:mod:`polytask.core.data.pretrained_tokenizers`).
"""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

from polytask.core.data.task_data import SEP

PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3, 4


def sentinel_piece(k: int) -> str:
    """T5's name of the ``k``-th sentinel."""
    return f"<extra_id_{k}>"


@runtime_checkable
class TextTokenizer(Protocol):
    """Text <-> ids, as the collator, the decoders and evaluation use them.

    The collator frames a row as ``src = encode_source(source)``,
    ``tgt_in = [bos_id] + encode(target)`` and ``labels = encode(target) + [eos_id]``
    (:mod:`polytask.core.data.collate`); generation starts from ``bos_id`` and stops at
    ``eos_id``; ``decode`` turns generated ids back into text.

    Attributes (read-only):
        vocab_size: number of ids the tokenizer can produce (a model's vocabulary may be
            larger, e.g. T5's 32128 rows for 32100 ids).
        pad_id: padding id.
        eos_id: end of sequence: closes every label row and stops generation.
        bos_id: the *decoder start* id put before the target (polytask: 2; T5: the pad id 0;
            BART: ``decoder_start_token_id``, 2 = eos) — not necessarily a "<s>" piece.
    """

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Content ids of ``text``, no special tokens added (targets, label words)."""
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``."""
    def encode_source(self, text: str) -> list[int]:
        """A model input, framed as the model was trained to see it (T5 ends it with eos,
        BART wraps it in ``<s> ... </s>``, polytask's own tokenizer adds nothing)."""
    def encode_source_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode_source(t) for t in texts]``."""
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first eos, special ids skipped; accepts tensors."""
    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """``[decode(r) for r in rows]``; accepts a ``(b, t)`` tensor."""
    def save(self, directory: str | Path) -> None:
        """Write what loading needs again into ``directory`` (a pretrained tokenizer: files that
        ``pretrained_tokenizers.load_tokenizer`` reads back; polytask's :class:`Tokenizer`
        writes its one ``.model`` file at the path given)."""


def sentencepiece_processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    """A processor of a serialized sentencepiece model; an empty or unparsable one is a
    ``ValueError`` (sentencepiece raises ``RuntimeError``, or for empty bytes builds a model
    without pieces that logs an error on every call)."""
    if not model_proto:
        raise ValueError("empty file, not a sentencepiece model")
    try:
        return spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError:  # its message is the failed C++ check, nothing a user can act on
        raise ValueError(f"not a sentencepiece model (its {len(model_proto)} bytes do not "
                         "parse)") from None


class Tokenizer:
    """Text <-> ids. Build with :meth:`train` or :meth:`load`."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.sp = sentencepiece_processor(model_proto)
        specials = {"pad": (self.sp.pad_id(), PAD_ID), "unk": (self.sp.unk_id(), UNK_ID),
                    "bos": (self.sp.bos_id(), BOS_ID), "eos": (self.sp.eos_id(), EOS_ID)}
        for name, (got, want) in specials.items():
            if got != want:
                raise ValueError(f"sentencepiece model has {name} id {got}, polytask needs {want}")
        # only now: on a model without pieces piece_to_id logs to stderr instead of raising
        if self.sp.piece_to_id(SEP) != SEP_ID:
            raise ValueError(f"sentencepiece model has {SEP} id {self.sp.piece_to_id(SEP)}, "
                             f"polytask needs {SEP_ID}")
        if self.sp.get_piece_size() <= SEP_ID + 1:
            raise ValueError(f"sentencepiece model has {self.sp.get_piece_size()} pieces, only "
                             "the special ones; it cannot encode text")
        self._sentinel_ids = _sentinel_ids(self.sp)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              model_type: Literal["unigram", "bpe"] = "unigram", *,
              hard_vocab_limit: bool = True, max_sentence_length: int = 16384,
              seed_sentencepiece_size: int = 100_000, fit_vocab: bool = True,
              sentinels: int = 0, split_digits: bool = False) -> "Tokenizer":
        """Train on ``texts`` (e.g. every source and target of the training splits).

        Args:
            texts: the corpus, one string per sentence; empty strings are skipped.
            vocab_size: number of pieces including the 5 special ones.
            model_type: ``unigram`` (Kudo 2018, T5's choice) or ``bpe`` (Sennrich et al. 2016).
            hard_vocab_limit: False allows a smaller vocabulary when the corpus is small.
            fit_vocab: when the corpus cannot support ``vocab_size``, retrain at the largest
                size sentencepiece's error states (``Please set it to a value <= N``) and say
                so once on stderr; False raises instead.
            sentinels: number of T5 sentinel pieces ``<extra_id_k>`` to add after ``[SEP]``
                (for span corruption); they count towards ``vocab_size``.
            split_digits: every digit its own piece (sentencepiece's ``split_digits``, as in
                PaLM and LLaMA), so numbers are spelled the same way whatever the corpus
                held; a corpus with few digits otherwise gives some ``▁d`` pieces and not
                others, and digit sequences tokenize unevenly.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"unknown model_type {model_type!r}; choose 'unigram' or 'bpe'")
        if not isinstance(sentinels, int) or sentinels < 0:
            raise ValueError(f"sentinels ({sentinels!r}) must be an integer >= 0")
        if vocab_size <= SEP_ID + 1 + sentinels:
            raise ValueError(f"vocab_size ({vocab_size}) must exceed the {SEP_ID + 1} special ids "
                             f"and {sentinels} sentinels")
        corpus = [t for t in texts if t and t.strip()]
        if not corpus:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        options = dict(model_type=model_type, hard_vocab_limit=hard_vocab_limit,
                       max_sentence_length=max_sentence_length,
                       seed_sentencepiece_size=seed_sentencepiece_size,
                       symbols=[SEP] + [sentinel_piece(k) for k in range(sentinels)],
                       split_digits=split_digits)
        try:
            return cls(_train_model(corpus, vocab_size, **options))
        except RuntimeError as err:
            error = err
        largest = _supported_size(str(error))
        if fit_vocab and largest is not None and SEP_ID + 1 + sentinels < largest < vocab_size:
            try:
                model = _train_model(corpus, largest, **options)
            except RuntimeError:
                pass   # report the first error, which names the size asked for
            else:
                print(f"polytask: note: data.vocab_size {vocab_size} is more than this corpus "
                      f"supports; using {largest}", file=sys.stderr)
                return cls(model)
        raise ValueError(
            f"sentencepiece could not build a {model_type} vocabulary of {vocab_size} from "
            f"{len(corpus)} texts: {str(error).rstrip('.')}. "
            + ("Raise data.vocab_size" if "smaller than required_chars" in str(error)
               else "Lower data.vocab_size or pass hard_vocab_limit=False")
        ) from None

    def save(self, path: str | Path) -> None:
        """Write the sentencepiece model (a standard ``.model`` file)."""
        Path(path).write_bytes(self.model_proto)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a ``.model`` file :meth:`save` wrote; a missing, damaged or foreign one is a
        ``ValueError`` naming it."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: tokenizer model not found")
        try:
            return cls(path.read_bytes())
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id, sep_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in that order; empty if none."""
        return list(self._sentinel_ids)

    @property
    def mask_id(self) -> int:
        """BART's mask token for text infilling: ``<extra_id_0>`` (see the module docstring)."""
        if not self._sentinel_ids:
            raise ValueError("this tokenizer has no mask token: train it with sentinels >= 1 "
                             "(Tokenizer.train(..., sentinels=n))")
        return self._sentinel_ids[0]

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text``, without bos / eos (the collator adds them)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    # A source is encoded like any text: polytask's models were never taught a source eos, and
    # adding one would change every trained run's inputs.
    encode_source = encode
    encode_source_batch = encode_batch

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first eos; pad and bos are skipped. Accepts tensors."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        return self.sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
        return [self.decode(r) for r in rows]

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


def _train_model(corpus: list[str], vocab_size: int, *, model_type: str, hard_vocab_limit: bool,
                 max_sentence_length: int, seed_sentencepiece_size: int,
                 symbols: list[str], split_digits: bool = False) -> bytes:
    """The serialized sentencepiece model trained on ``corpus`` (``RuntimeError`` if it fails)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0,
        normalization_rule_name="identity", hard_vocab_limit=hard_vocab_limit,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=symbols, max_sentence_length=max_sentence_length,
        seed_sentencepiece_size=seed_sentencepiece_size, split_digits=split_digits,
        num_threads=1, minloglevel=2)  # one thread: deterministic, and we share 2 cores
    return model.getvalue()


def _sentinel_ids(sp: spm.SentencePieceProcessor) -> tuple[int, ...]:
    """Ids of the consecutive pieces ``<extra_id_0>``, ``<extra_id_1>``, ... the model holds
    (``piece_to_id`` answers unk for a piece it does not have)."""
    ids: list[int] = []
    while (i := sp.piece_to_id(sentinel_piece(len(ids)))) != UNK_ID:
        ids.append(i)
    return tuple(ids)


def _supported_size(message: str) -> int | None:
    """The largest vocabulary sentencepiece's "Vocabulary size too high" error allows."""
    match = re.search(r"Please set it to a value <= (\d+)", message)
    return int(match[1]) if match else None

"""A pretrained checkpoint's own tokenizer, read from a local Hugging Face directory.

Two families, each with the checkpoint's special ids (no polytask ids imposed):

* :class:`T5SentencePiece` — T5 (Raffel et al. 2020): the sentencepiece unigram model
  ``spiece.model`` (Kudo & Richardson 2018) in T5's layout, pad 0, eos 1, unk 2, no bos, plus
  the sentinels ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` placed after the pieces counting
  down, ``<extra_id_0>`` = the highest id (Hugging Face's ``T5Tokenizer``). A source ends with
  eos; the decoder starts from the pad id.
* :class:`BartBPE` — BART (Lewis et al. 2020): GPT-2's byte-level BPE (Radford et al. 2019)
  through the ``tokenizers`` package, from ``tokenizer.json`` or else ``vocab.json`` +
  ``merges.txt``; ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` wherever the
  files put it. A source is ``<s> ... </s>``; the decoder starts from
  ``decoder_start_token_id`` (2 = eos).

Both follow :class:`polytask.core.data.tokenizer.TextTokenizer`, and the reference is Hugging
Face's tokenizer of the same directory (``tests/core/data/test_pretrained_tokenizers.py``
compares ids and text): ``encode(t)`` = ``hf(t, add_special_tokens=False)["input_ids"]``,
``encode_source(t)`` = ``hf(t)["input_ids"]``, ``decode(ids)`` =
``hf.decode(ids, skip_special_tokens=True)``. As there, the text of a special token (``</s>``,
``<pad>``, ``<unk>``, a sentinel; for BART also ``<s>`` and ``<mask>``) written in the input is
encoded as that token, and decoding skips every special id (pad, eos, unk, sentinels, mask) and
every id the tokenizer cannot produce (a model's padding rows, T5's 32100..32127). One
difference: ``decode`` stops at the first eos, where Hugging Face skips it and goes on — after
skipping a leading decoder start id, since BART's is its eos (polytask's ``generate`` returns
rows without it; Hugging Face's ``generate`` with it).

polytask's instruction separator (``task_data.SEP``, the literal text ``[SEP]`` between
instruction and input) is not a piece of these vocabularies, and none is added: it is encoded as
ordinary text (T5: e.g. ``▁[``, ``S``, ``EP``, ``]``; BART: bytes ``[``, ``SE``, ``P``, ``]``),
which the pretrained model reads as punctuation, as it reads FLAN's and T0's plain-text
templates. Adding a piece would need a new embedding row the checkpoint never trained.

:func:`load_tokenizer` recognises a directory by its files: ``spiece.model`` -> T5, else
``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` -> BART. ``save`` writes those files and a
``tokenizer_config.json`` (``extra_ids`` / ``decoder_start_token_id``) that both
:func:`load_tokenizer` and Hugging Face's ``from_pretrained`` read back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from polytask.core.data.tokenizer import TextTokenizer, sentencepiece_processor

if TYPE_CHECKING:
    import tokenizers

SPIECE, TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT = "spiece.model", "tokenizer.json", "vocab.json", "merges.txt"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
T5_LAYOUT = {"pad": 0, "eos": 1, "unk": 2, "bos": -1}
BART_LAYOUT = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def _read_json(path: Path) -> dict[str, Any]:
    """A config file's object, ``{}`` when there is no file; a damaged one is a ``ValueError``
    naming it (not json's bare message)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _configs(directory: Path) -> list[dict[str, Any]]:
    return [_read_json(directory / name) for name in CONFIG_FILES]


def _token_names(value: Any) -> list[str]:
    """Token strings of a config entry: a str, an AddedToken dict, or a list / dict of them."""
    if value is None:
        return []
    if isinstance(value, dict) and "content" not in value:
        value = list(value.values())     # transformers 5's named extra_special_tokens
    items = value if isinstance(value, list) else [value]
    return [item["content"] if isinstance(item, dict) else str(item) for item in items]


def _decoder_start(directory: Path, default: int, vocab_size: int) -> int:
    """``decoder_start_token_id`` from the model's config.json, else from the
    tokenizer_config.json :meth:`save` writes, else ``default``."""
    for name in ("config.json", "tokenizer_config.json"):
        start = _read_json(directory / name).get("decoder_start_token_id")
        if start is not None:
            break
    start = default if start is None else start
    if not isinstance(start, int) or not 0 <= start < vocab_size:
        raise ValueError(f"{directory}: decoder_start_token_id {start!r} is not an id of the "
                         f"tokenizer (0..{vocab_size - 1})")
    return start


def _content_ids(ids: Any, start_id: int, eos_id: int, skip: set[int], vocab_size: int) -> list[int]:
    """``ids`` (list or tensor) without a leading decoder start id, up to the first eos, without
    the ids in ``skip`` and those outside ``0..vocab_size-1``."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if ids[:1] == [start_id]:   # a row as Hugging Face's generate returns it; BART starts with eos
        ids = ids[1:]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return [i for i in ids if i not in skip and 0 <= i < vocab_size]


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


class T5SentencePiece:
    """T5's tokenizer: ``spiece.model`` plus ``extra_ids`` sentinels (module docstring).

    Args:
        model_proto: the serialized sentencepiece model (``spiece.model``'s bytes).
        extra_ids: number of sentinels ``<extra_id_i>``, id ``pieces + extra_ids - 1 - i``.
        decoder_start_id: ``bos_id``; None: the pad id (T5's ``decoder_start_token_id``).
    """

    def __init__(self, model_proto: bytes, extra_ids: int = 100,
                 decoder_start_id: int | None = None) -> None:
        self.model_proto = model_proto
        self.sp = sentencepiece_processor(model_proto)
        found = {"pad": self.sp.pad_id(), "eos": self.sp.eos_id(), "unk": self.sp.unk_id(),
                 "bos": self.sp.bos_id()}
        if found != T5_LAYOUT:
            raise ValueError(f"sentencepiece model has {_ids(found)}; T5's layout is "
                             f"{_ids(T5_LAYOUT)} (-1: none)")
        if extra_ids < 0:
            raise ValueError(f"extra_ids ({extra_ids}) must be >= 0")
        self.extra_ids, pieces = extra_ids, self.sp.get_piece_size()
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.bos_id = self.pad_id if decoder_start_id is None else decoder_start_id
        if not 0 <= self.bos_id < self.vocab_size:
            raise ValueError(f"decoder_start_id ({self.bos_id}) is not an id (0..{self.vocab_size - 1})")
        # Hugging Face splits these texts out of the input before sentencepiece sees them.
        self.specials = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.unk_id)}
        self.specials.update({f"<extra_id_{i}>": pieces + extra_ids - 1 - i for i in range(extra_ids)})
        self._split = re.compile("|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))))
        self._skip = set(self.specials.values())

    @classmethod
    def from_directory(cls, directory: str | Path) -> "T5SentencePiece":
        """Read ``spiece.model``, ``extra_ids`` (tokenizer_config.json / special_tokens_map.json:
        ``extra_ids`` or the ``<extra_id_i>`` listed in ``additional_special_tokens`` /
        ``extra_special_tokens``; default 100) and ``decoder_start_token_id`` (config.json)."""
        directory = Path(directory)
        if not (directory / SPIECE).is_file():
            raise ValueError(f"{directory}: no {SPIECE}")
        configs = _configs(directory)
        declared = next((c["extra_ids"] for c in configs if "extra_ids" in c), None)
        listed = {t for c in configs for key in ("additional_special_tokens", "extra_special_tokens")
                  for t in _token_names(c.get(key)) if _SENTINEL.fullmatch(t)}
        extra_ids = declared if declared is not None else len(listed) if listed else 100
        if listed and listed != {f"<extra_id_{i}>" for i in range(extra_ids)}:
            raise ValueError(f"{directory}: extra_ids is {extra_ids} but the configs list "
                             f"{len(listed)} sentinels ({', '.join(sorted(listed)[:3])}, ...)")
        try:
            tok = cls((directory / SPIECE).read_bytes(), extra_ids)
        except ValueError as err:
            raise ValueError(f"{directory / SPIECE}: {err}") from None
        tok.bos_id = _decoder_start(directory, tok.pad_id, tok.vocab_size)
        return tok

    def save(self, directory: str | Path) -> None:
        """``spiece.model`` and ``tokenizer_config.json`` (``extra_ids``, decoder start)."""
        directory = Path(directory)
        _write_config(directory, {"tokenizer_class": "T5Tokenizer", "extra_ids": self.extra_ids,
                                  "decoder_start_token_id": self.bos_id})
        (directory / SPIECE).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        """Pieces + sentinels (32100 for the released T5 models)."""
        return self.sp.get_piece_size() + self.extra_ids

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``, the i-th span-corruption sentinel."""
        if not 0 <= i < self.extra_ids:
            raise ValueError(f"sentinel {i} out of range: the tokenizer has {self.extra_ids}")
        return self.specials[f"<extra_id_{i}>"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Special texts are cut out first; each chunk between them is encoded on its own (so it
        # gets sentencepiece's dummy "▁" prefix), all chunks in one sentencepiece call. A plan
        # lists, per text, chunk numbers (int) and special ids ([id]) in order.
        plans: list[list[int | list[int]]] = []
        chunks: list[str] = []
        for text in texts:
            plan: list[int | list[int]] = []
            start = 0
            for match in self._split.finditer(text):
                plan += [len(chunks), [self.specials[match.group()]]]
                chunks.append(text[start:match.start()])
                start = match.end()
            plans.append(plan + [len(chunks)])
            chunks.append(text[start:])
        pieces = self.sp.encode(chunks, out_type=int)
        return [[i for part in plan for i in (pieces[part] if isinstance(part, int) else part)]
                for plan in plans]

    def encode(self, text: str) -> list[int]:
        """Content ids: pieces and special ids, no eos."""
        return self.encode_batch([text])[0]

    def encode_source_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids + [self.eos_id] for ids in self.encode_batch(texts)]

    def encode_source(self, text: str) -> list[int]:
        """``encode(text) + [eos]``, as T5's ``tokenizer(text)["input_ids"]``."""
        return self.encode(text) + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first eos; pad, unk, sentinels and unknown ids skipped."""
        ids = _content_ids(ids, self.bos_id, self.eos_id, self._skip, self.sp.get_piece_size())
        return self.sp.decode(ids)

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
        return [self.decode(r) for r in rows]


def _ids(found: dict[str, int | None]) -> str:
    return ", ".join(f"{name} {i}" for name, i in found.items())


def _check_bart_layout(tokenizer: "tokenizers.Tokenizer") -> int:
    """Raise unless ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3 and a ``<mask>``; its id."""
    found = {name: tokenizer.token_to_id(name) for name in (*BART_LAYOUT, "<mask>")}
    if {k: found[k] for k in BART_LAYOUT} != BART_LAYOUT or found["<mask>"] is None:
        raise ValueError(f"byte-level BPE has {_ids(found)}; BART's layout is "
                         f"{_ids(BART_LAYOUT)} and a <mask>")
    return found["<mask>"]


def _read_tokenizers(read: Callable[[], Any], where: str | Path) -> Any:
    """``read()``, with the ``tokenizers`` package's plain ``Exception`` on a damaged file
    turned into a ``ValueError`` naming ``where``."""
    try:
        return read()
    except Exception as err:  # noqa: BLE001 (tokenizers raises bare Exception)
        raise ValueError(f"{where}: not a readable tokenizer file ({err})") from None


class BartBPE:
    """BART's byte-level BPE (module docstring), a ``tokenizers.Tokenizer`` in BART's layout.

    Args:
        tokenizer: the ``tokenizers`` object; its added special tokens (which texts are split
            out of the input, ``<mask>``'s ``lstrip``) are the checkpoint's.
        decoder_start_id: ``bos_id``, BART's ``decoder_start_token_id`` (2 = eos).
    """

    def __init__(self, tokenizer: "tokenizers.Tokenizer", decoder_start_id: int = 2) -> None:
        self.tokenizer = tokenizer
        self.mask_id = _check_bart_layout(tokenizer)
        self.sos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        if not 0 <= decoder_start_id < self.vocab_size:
            raise ValueError(f"decoder_start_id ({decoder_start_id}) is not an id (0..{self.vocab_size - 1})")
        self.bos_id = decoder_start_id

    @classmethod
    def from_directory(cls, directory: str | Path) -> "BartBPE":
        """``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt`` with BART's
        pre-tokenizer and decoder (and ``mask_token``'s lstrip / rstrip from
        tokenizer_config.json / special_tokens_map.json); ``decoder_start_token_id`` from
        config.json, default 2."""
        try:
            import tokenizers  # optional dependency: only BART checkpoints need it
        except ImportError:
            raise ImportError(f"{directory}: reading a BART tokenizer needs the 'tokenizers' "
                              "package (pip install tokenizers)") from None
        directory = Path(directory)
        if (directory / TOKENIZER_JSON).is_file():
            tok = _read_tokenizers(lambda: tokenizers.Tokenizer.from_file(
                str(directory / TOKENIZER_JSON)), directory / TOKENIZER_JSON)
            kind = type(tok.model).__name__
            if kind != "BPE":
                raise ValueError(f"{directory / TOKENIZER_JSON} holds a {kind} model, not BART's "
                                 f"byte-level BPE (a T5 checkpoint is read from its {SPIECE})")
        elif (directory / VOCAB_JSON).is_file() and (directory / MERGES_TXT).is_file():
            tok = tokenizers.Tokenizer(_read_tokenizers(lambda: tokenizers.models.BPE.from_file(
                str(directory / VOCAB_JSON), str(directory / MERGES_TXT)),
                f"{directory / VOCAB_JSON} + {MERGES_TXT}"))
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
            try:    # before the special tokens are added: a missing one would be appended
                _check_bart_layout(tok)
            except ValueError as err:
                raise ValueError(f"{directory}: {err}") from None
            mask = next((c["mask_token"] for c in _configs(directory) if "mask_token" in c), "<mask>")
            flags = ({k: bool(mask.get(k, False)) for k in ("lstrip", "rstrip")}
                     if isinstance(mask, dict) else {})
            tok.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)
                                    for name in BART_LAYOUT]
                                   + [tokenizers.AddedToken(_token_names(mask)[0], special=True,
                                                            normalized=False, **flags)])
        else:
            raise ValueError(f"{directory}: no {TOKENIZER_JSON} and no {VOCAB_JSON} + {MERGES_TXT}")
        try:
            tok = cls(tok)
        except ValueError as err:
            raise ValueError(f"{directory}: {err}") from None
        tok.bos_id = _decoder_start(directory, tok.eos_id, tok.vocab_size)
        return tok

    def save(self, directory: str | Path) -> None:
        """``tokenizer.json`` and ``tokenizer_config.json`` (decoder start)."""
        directory = Path(directory)
        _write_config(directory, {"tokenizer_class": "BartTokenizer",
                                  "decoder_start_token_id": self.bos_id})
        self.tokenizer.save(str(directory / TOKENIZER_JSON))

    @property
    def vocab_size(self) -> int:
        """Vocabulary with the added tokens (50265 for the released BART models)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Content ids, no ``<s>`` / ``</s>``."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_source_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.sos_id, *ids, self.eos_id] for ids in self.encode_batch(texts)]

    def encode_source(self, text: str) -> list[int]:
        """``<s> text </s>``, as BART's ``tokenizer(text)["input_ids"]``."""
        return [self.sos_id, *self.encode(text), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first eos; special tokens and unknown ids skipped."""
        ids = _content_ids(ids, self.bos_id, self.eos_id, set(), self.vocab_size)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
        return [self.decode(r) for r in rows]


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """The tokenizer of a Hugging Face checkpoint directory (or one :meth:`save` wrote):
    ``spiece.model`` -> :class:`T5SentencePiece`; ``tokenizer.json`` or ``vocab.json`` +
    ``merges.txt`` -> :class:`BartBPE`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    if (directory / SPIECE).is_file():
        return T5SentencePiece.from_directory(directory)
    if (directory / TOKENIZER_JSON).is_file() or (
            (directory / VOCAB_JSON).is_file() and (directory / MERGES_TXT).is_file()):
        return BartBPE.from_directory(directory)
    raise ValueError(f"{directory}: no tokenizer found; looked for {SPIECE} (T5), "
                     f"{TOKENIZER_JSON} or {VOCAB_JSON} + {MERGES_TXT} (BART)")

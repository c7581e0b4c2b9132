"""The data side of ``polytask pretrain`` (:mod:`polytask.experiments.pretrain`): the corpus's
training documents (for the tokenizer), the noising function of ``pretrain.objective``, the
fixed validation batches, and padded tensors of noised rows.

The split is :class:`polytask.core.data.stream.TextStream`'s: document ``i`` (blank lines not
counted) is validation text when ``i % pretrain.validation_every == 0``. Every row is a pair
``(inputs, targets)`` from :mod:`polytask.core.data.noising`; the decoder reads
``[bos] + targets`` and predicts ``targets + [eos]``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from polytask.core.data.batch import IGNORE_INDEX
from polytask.core.data.noising import span_corruption, text_infilling
from polytask.core.data.stream import TextStream, iter_documents
from polytask.core.data.tokenizer import Tokenizer
from polytask.experiments.pretrain_config import PretrainConfig

Rows = list[tuple[list[int], list[int]]]   # (noised input ids, target ids) per example


def training_documents(paths: list[Path], field: str, validation_every: int,
                       limit: int) -> list[str]:
    """The first ``limit`` training documents (the stream's split: document ``i`` is
    validation when ``i % validation_every == 0``); none at all is an error."""
    texts: list[str] = []
    try:
        for i, (_, _, text) in enumerate(iter_documents(paths, field=field)):
            if i % validation_every:
                texts.append(text)
                if len(texts) >= limit:
                    break
    except ValueError as err:   # a bad line: the file and line, and the keys that choose them
        raise ValueError(f"pretrain.corpus (pretrain.field = {field!r}): {err}") from None
    if not texts:
        raise ValueError(f"pretrain.corpus: {', '.join(map(str, paths))}: no training documents "
                         f"(empty, or its one document is validation text)")
    return texts


def noiser(cfg: PretrainConfig, tokenizer: Tokenizer
           ) -> Callable[[list[int], np.random.Generator], tuple[list[int], list[int]]]:
    """``noise(chunk, rng) -> (inputs, targets)`` for ``pretrain.objective``."""
    p = cfg.pretrain
    sentinels = list(getattr(tokenizer, "sentinel_ids", []))
    if len(sentinels) < p.sentinels:
        whose = f"the tokenizer of init: {cfg.init}" if cfg.init else "the tokenizer"
        raise ValueError(f"pretrain.sentinels = {p.sentinels} but {whose} has {len(sentinels)} "
                         "sentinel pieces; lower pretrain.sentinels")
    if p.objective == "span_corruption":
        objective = functools.partial(span_corruption, sentinel_ids=sentinels[:p.sentinels],
                                      noise_density=p.noise_density,
                                      mean_noise_span_length=p.mean_span_length)
    else:
        objective = functools.partial(text_infilling, mask_id=tokenizer.mask_id,
                                      mask_ratio=p.mask_ratio, poisson_lambda=p.poisson_lambda)

    # absolute positions end at model.max_length: the rare draw that outgrows them (many
    # spans, or text infilling's 0-length spans) is cut rather than stopping the run
    limit = cfg.model.max_length if cfg.model.positions in ("learned", "sinusoidal") else None

    def noise(chunk: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        inputs, targets = objective(chunk, rng)
        return ([int(i) for i in inputs][:limit],
                [int(i) for i in targets][:None if limit is None else limit - 1])
    return noise


def validation_rows(cfg: PretrainConfig, paths: list[Path], tokenizer: Tokenizer,
                     noise: Callable) -> list[Rows]:
    """``pretrain.eval_batches`` fixed batches of noised validation chunks (its own generator:
    the same batches at every evaluation, whatever the training stream did)."""
    p, t = cfg.pretrain, cfg.train
    stream = TextStream(paths, tokenizer.encode, eos_id=tokenizer.eos_id,
                        chunk_tokens=p.chunk_tokens, split="validation", seed=t.seed,
                        shuffle_buffer=1, validation_every=p.validation_every, field=p.field,
                        repeat=False)
    rng = np.random.default_rng((t.seed, 1))
    rows = [noise(chunk, rng) for _, chunk in zip(range(p.eval_batches * t.batch_size), stream)]
    if not rows:
        raise ValueError(f"pretrain.corpus: {', '.join(map(str, paths))}: no validation text "
                         f"(every pretrain.validation_every = {p.validation_every}th document "
                         "is validation; lower it)")
    return [rows[i:i + t.batch_size] for i in range(0, len(rows), t.batch_size)]


def collate_rows(rows: Rows, tokenizer: Tokenizer, device: str) -> dict[str, torch.Tensor]:
    """Padded tensors: ``src`` the noised inputs, ``tgt_in`` = [bos] + targets, ``labels`` =
    targets + [eos] (pad positions ``IGNORE_INDEX``), and their masks (True = real)."""
    src = [s for s, _ in rows]
    tgt_in = [[tokenizer.bos_id] + t for _, t in rows]
    labels = [t + [tokenizer.eos_id] for _, t in rows]

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(1, max(len(s) for s in seqs))
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], device=device)

    src_ids, tgt_ids = pad(src, tokenizer.pad_id), pad(tgt_in, tokenizer.pad_id)
    src_mask = pad([[1] * len(s) for s in src], 0).bool()
    tgt_mask = pad([[1] * len(s) for s in tgt_in], 0).bool()
    return {"src_ids": src_ids, "tgt_ids": tgt_ids, "src_mask": src_mask, "tgt_mask": tgt_mask,
            "labels": pad(labels, IGNORE_INDEX)}


def corpus_size(paths: list[Path], field: str, tokenizer: Tokenizer) -> dict[str, int]:
    """Documents and token ids (each document's eos counted) of the whole corpus."""
    documents = tokens = 0
    block: list[str] = []
    for _, _, text in iter_documents(paths, field=field):
        documents += 1
        block.append(text)
        if len(block) == 1000:
            tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(block))
            block = []
    tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(block)) if block else 0
    return {"documents": documents, "tokens": tokens}

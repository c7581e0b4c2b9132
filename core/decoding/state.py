"""The state of one decoding run: the encoder memory, the source mask, the KV cache, and the
fused decoding step when the run is accelerated. Greedy and sampled decoding
(:mod:`polytask.core.decoding.generation`) and beam search (:mod:`polytask.core.decoding.beam`)
share it.

The model is duck-typed: anything with ``encode(src_ids, src_mask) -> memory (b, s, d)``,
``decode(tgt_ids, memory, src_mask=None, tgt_mask=None, cache=None) -> hidden (b, t, d)``,
``logits(hidden) -> (b, t, V)`` and ``new_cache()`` (an object with ``.length`` and
``.reorder(index)``) works: :class:`polytask.core.model.transformer.EncoderDecoder`, a
multi-task model's ``for_task(name)`` view (with any PEFT applied, :mod:`polytask.core.peft`).
"""
from __future__ import annotations

from typing import Any

import torch

from polytask.core.decoding.step import DecodingStep


class DecoderState:
    """The encoder memory, source mask and (optional) KV cache of one decoding run.

    Args:
        model: the duck-typed encoder-decoder (see the module docstring).
        memory: ``(b, s, d)`` encoder output.
        src_mask: ``(b, s)`` bool, True = real source token.
        use_cache: keep a KV cache (fast path) or re-run the decoder on the full prefix.
        step: take the cached one-token steps through a
            :class:`polytask.core.decoding.step.DecodingStep` (built here where the model
            allows one); False always runs the decoder's modules (the step's twin).
    """

    def __init__(self, model: Any, memory: torch.Tensor, src_mask: torch.Tensor,
                 use_cache: bool, *, step: bool = False) -> None:
        self.model = model
        self.memory = memory
        self.src_mask = src_mask
        self.cache = model.new_cache() if use_cache else None
        #: the run's DecodingStep, or None when the modules run
        self.step = DecodingStep.build(model) if use_cache and step else None

    def next_token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, V)`` for the token after ``tokens`` ``(b, t)`` (which start with bos).

        Every position of ``tokens`` counts as real (tgt_mask all True): tokens after a row's
        eos are padding the caller ignores, and the start token may equal pad_id (T5), so
        deriving the mask from pad_id would be wrong here.
        """
        new = tokens if self.cache is None else tokens[:, self.cache.length:]  # (b, 1) cached
        tgt_mask = torch.ones_like(new, dtype=torch.bool)
        layers = {"layers": self.step.layers} if self.step is not None and new.shape[1] == 1 else {}
        hidden = self.model.decode(new, self.memory, src_mask=self.src_mask, tgt_mask=tgt_mask,
                                   cache=self.cache, **layers)
        return self.model.logits(hidden[:, -1:])[:, -1].float()  # (b, V)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` ``(b',)`` (beam search: the parents of the surviving beams)."""
        self.memory = self.memory.index_select(0, index)
        self.src_mask = self.src_mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


def start_decoding(model: Any, src_ids: torch.Tensor, src_mask: torch.Tensor | None,
                   pad_id: int, use_cache: bool, *, step: bool = False) -> DecoderState:
    """Encode ``src_ids`` ``(b, s)`` once and return the :class:`DecoderState`;
    ``src_mask=None`` means ``src_ids != pad_id``; ``step`` as in :class:`DecoderState`."""
    if src_ids.dim() != 2:
        raise ValueError(f"src_ids must be (b, s), got shape {tuple(src_ids.shape)}")
    if src_mask is None:
        src_mask = src_ids != pad_id
    memory = model.encode(src_ids, src_mask)
    return DecoderState(model, memory, src_mask, use_cache, step=step)

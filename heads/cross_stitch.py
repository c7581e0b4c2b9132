"""Cross-stitch units (Misra, Shrivastava, Gupta & Hebert 2016, "Cross-stitch Networks for
Multi-task Learning", CVPR), on a plan whose slots are all private (``none`` or ``soft``).

Every task keeps its own column (its private backbone) and every input runs through ALL the
columns; after each layer of each stack the columns exchange activations with learned weights
(eq. 1, generalised from 2 to k tasks):

    x~_k = sum_j alpha[k, j] * x_j            alpha: (k, k) per layer boundary

initialised to ``alpha_S = 0.9`` on the diagonal and ``alpha_D = 0.1 / (k - 1)`` elsewhere
(the paper's (0.9, 0.1) for two tasks, rows summing to 1). A row of task k reads column k.
The cost is k full passes per row; with ``alpha = I`` it is exactly the ``none`` plan.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn

from polytask.core.model.transformer import DecoderCache

if TYPE_CHECKING:  # annotations only: polytask.heads.model imports this module
    from polytask.heads.model import MultiTaskModel


class CrossStitch(nn.Module):
    """The ``alpha`` matrices: ``encoder`` ``(n_enc, k, k)`` and ``decoder`` ``(n_dec, k, k)``,
    one per layer (applied to the layer's output)."""

    def __init__(self, n_tasks: int, n_encoder_layers: int, n_decoder_layers: int,
                 same: float = 0.9) -> None:
        super().__init__()
        if n_tasks < 2:
            raise ValueError(f"cross-stitch units need >= 2 tasks, got {n_tasks}")
        alpha = torch.full((n_tasks, n_tasks), (1.0 - same) / (n_tasks - 1))
        alpha.fill_diagonal_(same)
        self.encoder = nn.Parameter(alpha.repeat(n_encoder_layers, 1, 1))
        self.decoder = nn.Parameter(alpha.repeat(n_decoder_layers, 1, 1))

    @staticmethod
    def mix(alpha: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``alpha (k, k)``, ``columns (k, b, t, d)`` -> ``(k, b, t, d)``, eq. 1 of the paper."""
        return torch.einsum("kj,jbtd->kbtd", alpha.to(columns.dtype), columns)


def encode_columns(model: "MultiTaskModel", src: torch.Tensor, src_mask: torch.Tensor
                   ) -> torch.Tensor:
    """All task columns on all rows: ``(b, s)`` -> memory ``(k, b, s, d)``."""
    views = [model.for_column(n) for n in model.plan.tasks]
    xs = [v.encoder.embed(v.embed(src)) for v in views]
    inputs = [v.encoder.prepare(src_mask) for v in views]
    for i in range(model.config.n_encoder_layers):
        ys = [v.encoder.layers[i](x, p.mask, p.position_bias, p.rope)
              for v, x, p in zip(views, xs, inputs)]
        xs = list(CrossStitch.mix(model.cross_stitch.encoder[i], torch.stack(ys)))
    return torch.stack([v.encoder.norm(x) for v, x in zip(views, xs)])


def decode_columns(model: "MultiTaskModel", tgt: torch.Tensor, tgt_mask: torch.Tensor,
                   memory: torch.Tensor, src_mask: torch.Tensor,
                   caches: list[DecoderCache] | None = None) -> torch.Tensor:
    """All task columns: ``tgt (b, t)``, ``memory (k, b, s, d)`` -> hidden ``(k, b, t, d)``.

    With ``caches`` (one :class:`DecoderCache` per column) only the new positions are given and
    the caches grow, as in :meth:`polytask.core.model.transformer.Decoder.forward`.
    """
    views = [model.for_column(n) for n in model.plan.tasks]
    start = caches[0].length if caches else 0
    keys = tgt_mask if not start else torch.cat([caches[0].key_mask, tgt_mask], dim=1)
    ys = [v.decoder.embed(v.embed(tgt), start) for v in views]
    inputs = [v.decoder.prepare(keys, src_mask, tgt.shape[1]) for v in views]
    for i in range(model.config.n_decoder_layers):
        outs = [v.decoder.layers[i](y, m, p.self_mask, p.cross_mask, p.position_bias, p.rope,
                                    caches[c][i] if caches else None)
                for c, (v, y, m, p) in enumerate(zip(views, ys, memory, inputs))]
        ys = list(CrossStitch.mix(model.cross_stitch.decoder[i], torch.stack(outs)))
    if caches:
        for cache in caches:
            cache.key_mask = keys
    return torch.stack([v.decoder.norm(y) for v, y in zip(views, ys)])


class StitchedCache:
    """One :class:`DecoderCache` per column, with the ``length`` / ``reorder`` interface."""

    def __init__(self, caches: list[DecoderCache]) -> None:
        self.columns = caches

    @property
    def length(self) -> int:
        return self.columns[0].length

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.columns:
            cache.reorder(index)


class CrossStitchView:
    """Task ``k``'s EncoderDecoder interface over a cross-stitched model, for generation code.

    ``encode`` returns all columns' memories packed as ``(b, s, k * d)`` so that code which
    reorders memory rows (beam search) keeps working; ``decode`` unpacks them.
    """

    def __init__(self, model: "MultiTaskModel", name: str) -> None:
        self.model, self.k = model, model.task_index[name]
        self.column = model.for_column(name)
        self.config = self.column.config

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        src_mask = self.column._mask(src_ids, src_mask, "src_mask")
        return rearrange(encode_columns(self.model, src_ids, src_mask), "k b s d -> b s (k d)")

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor,
               src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
               cache: StitchedCache | None = None) -> torch.Tensor:
        columns = rearrange(memory, "b s (k d) -> k b s d", k=len(self.model.plan.tasks))
        if src_mask is None:
            src_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        if tgt_mask is None:  # as EncoderDecoder.decode: position 0 (the start token) is real
            tgt_mask = tgt_ids != self.config.pad_id
            if cache is None or cache.length == 0:
                tgt_mask[:, 0] = True
        hidden = decode_columns(self.model, tgt_ids, tgt_mask, columns, src_mask,
                                cache.columns if cache is not None else None)
        return hidden[self.k]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.column.logits(hidden)

    def new_cache(self) -> StitchedCache:
        return StitchedCache([self.column.new_cache() for _ in self.model.plan.tasks])

    def __call__(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                 src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        src_mask = self.column._mask(src_ids, src_mask, "src_mask")
        return self.logits(self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask, tgt_mask))

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

from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from polytask.core.model.transformer import DecoderCache, EncoderDecoder, run_layers


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


class StitchedLayer:
    """Layer ``i`` of every column as one callable for the backbone's layer loop
    (:func:`polytask.core.model.transformer.run_layers`): ``x`` ``(k * b, t, d)`` holds the
    columns one after the other; column c runs its own layer on its rows with its own stack
    inputs, then the columns are mixed by ``alpha`` ``(k, k)``."""

    def __init__(self, layers: Sequence[nn.Module], alpha: torch.Tensor,
                 column_args: Sequence[tuple]) -> None:
        self.layers, self.alpha, self.column_args = layers, alpha, column_args

    def __call__(self, x: torch.Tensor, *cache: "ColumnCaches") -> torch.Tensor:
        k = len(self.layers)
        outs = [layer(x_c, *args, *(cache[0].columns[c],) if cache else ())
                for c, (layer, x_c, args) in enumerate(zip(self.layers, x.chunk(k),
                                                           self.column_args))]
        return CrossStitch.mix(self.alpha, torch.stack(outs)).flatten(0, 1)


class ColumnCaches:
    """Layer ``n``'s cache of every column."""

    def __init__(self, columns: list) -> None:
        self.columns = columns


def encode_columns(views: Sequence[EncoderDecoder], stitch: CrossStitch, src: torch.Tensor,
                   src_mask: torch.Tensor) -> torch.Tensor:
    """All task columns on all rows: ``(b, s)`` -> memory ``(k, b, s, d)``. ``views``: each
    task's own EncoderDecoder (its column), in task order."""
    x = torch.cat([v.encoder.embed(v.embed(src)) for v in views])          # (k * b, s, d)
    args = [v.encoder.prepare(src_mask).layer_args() for v in views]
    layers = [StitchedLayer([v.encoder.layers[i] for v in views], stitch.encoder[i], args)
              for i in range(len(views[0].encoder.layers))]
    x = run_layers(x, layers, ())
    return torch.stack([v.encoder.norm(x_c) for v, x_c in zip(views, x.chunk(len(views)))])


def decode_columns(views: Sequence[EncoderDecoder], stitch: CrossStitch, tgt: torch.Tensor,
                   tgt_mask: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
                   cache: "StitchedCache | None" = None) -> torch.Tensor:
    """All task columns: ``tgt (b, t)``, ``memory (k, b, s, d)`` -> hidden ``(k, b, t, d)``.

    With ``cache`` only the new positions are given and the caches grow, as in
    :meth:`polytask.core.model.transformer.Decoder.forward`.
    """
    inputs = [v.decoder.prepare(tgt_mask, src_mask, cache) for v in views]
    y = torch.cat([v.decoder.embed(v.embed(tgt), p.start) for v, p in zip(views, inputs)])
    args = [p.layer_args(m) for p, m in zip(inputs, memory)]
    layers = [StitchedLayer([v.decoder.layers[i] for v in views], stitch.decoder[i], args)
              for i in range(len(views[0].decoder.layers))]
    y = run_layers(y, layers, (), cache.layers if cache is not None else None)
    if cache is not None:
        cache.key_mask = inputs[0].keys
    return torch.stack([v.decoder.norm(y_c) for v, y_c in zip(views, y.chunk(len(views)))])


class StitchedCache:
    """One :class:`DecoderCache` per column, with the ``length`` / ``key_mask`` / ``reorder``
    interface of one; ``layers[n]`` holds layer n's cache of every column."""

    def __init__(self, caches: list[DecoderCache]) -> None:
        self.columns = caches
        self.layers = [ColumnCaches([c.layers[n] for c in caches])
                       for n in range(len(caches[0].layers))]
        self.key_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.columns:
            cache.reorder(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)


class CrossStitchView(nn.Module):
    """Task ``k``'s EncoderDecoder interface over cross-stitched columns, for generation code.

    ``encode`` returns all columns' memories packed as ``(b, s, k * d)`` so that code which
    reorders memory rows (beam search) keeps working; ``decode`` unpacks them.
    """

    def __init__(self, views: Sequence[EncoderDecoder], stitch: CrossStitch, k: int) -> None:
        super().__init__()
        self.columns, self.stitch, self.k = nn.ModuleList(views), stitch, k
        self.column = views[k]
        self.config = self.column.config

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        src_mask = self.column._mask(src_ids, src_mask, "src_mask")
        return rearrange(encode_columns(list(self.columns), self.stitch, src_ids, src_mask),
                         "k b s d -> b s (k d)")

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor,
               src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
               cache: StitchedCache | None = None) -> torch.Tensor:
        columns = rearrange(memory, "b s (k d) -> k b s d", k=len(self.columns))
        if src_mask is None:
            src_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        if tgt_mask is None:  # as EncoderDecoder.decode: position 0 (the start token) is real
            tgt_mask = tgt_ids != self.config.pad_id
            if cache is None or cache.length == 0:
                tgt_mask[:, 0] = True
        hidden = decode_columns(list(self.columns), self.stitch, tgt_ids, tgt_mask, columns,
                                src_mask, cache)
        return hidden[self.k]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.column.logits(hidden)

    def new_cache(self) -> StitchedCache:
        return StitchedCache([self.column.new_cache() for _ in self.columns])

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        src_mask = self.column._mask(src_ids, src_mask, "src_mask")
        return self.logits(self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask, tgt_mask))

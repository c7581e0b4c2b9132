"""Row routing: run each row of a mixed-task batch through the module of its task's group.

Every layer of the backbone works row by row (attention never mixes rows), so a layer shared
by tasks {a, b} may run once on all their rows while a private layer of task c runs on c's
rows only. :func:`route` does the index_select / run / scatter-back; :class:`RoutedLayer` is
one slot's group modules as one layer for the backbone's layer loop
(:func:`polytask.core.model.transformer.run_layers`), so the mixed batch runs through the same
loop, masks and position inputs as a single task::

    x = route(row_embed, embed)                         # each row's embedding group
    p = view.encoder.prepare(src_mask)                  # masks, position bias, rope
    x = run_layers(x, [RoutedLayer(table, f"encoder.{i}", row_task) ...], p.layer_args())
    memory = RoutedLayer(table, "encoder.norm", row_task)(x)

The masks and the rotary embedding do not depend on the task; T5's relative position bias is a
parameter of the ``embedding`` slot, so rows of different embedding groups get their own group's
bias (a per-row ``(b, h, i, j)`` tensor, which :func:`rows_of` slices with the rows).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from polytask.core.model.config import ModelConfig
from polytask.core.model.transformer import EncoderDecoder, run_layers

Rows = torch.Tensor | slice  # a LongTensor of row indices, or slice(None) for all rows


class SlotTable(Protocol):
    """What routing reads of a multi-task model (:class:`polytask.heads.model.MultiTaskModel`)."""

    config: ModelConfig

    def module(self, slot: str, k: int) -> nn.Module:
        """Group ``k``'s module at ``slot``."""

    def row_groups(self, slot: str, row_task: torch.Tensor) -> torch.Tensor:
        """``(b,)`` task indices -> ``(b,)`` group index at ``slot``."""

    def group_view(self, slot: str, k: int) -> EncoderDecoder:
        """An EncoderDecoder holding group ``k``'s module at ``slot``."""


def route(row_group: torch.Tensor, run: Callable[[int, Rows], torch.Tensor]) -> torch.Tensor:
    """Call ``run(k, rows)`` once per group ``k`` present in ``row_group`` and reassemble.

    Args:
        row_group: ``(n,)`` long, the group (module index) of every row.
        run: ``run(k, rows) -> (len(rows), ...)``; ``rows`` indexes the n rows (a LongTensor,
            or ``slice(None)`` when one group holds every row: no copy, the plain fast path).
    Returns ``(n, ...)``: row i is the output of its group's call, in the original order.
    """
    present = torch.unique(row_group).tolist()
    if len(present) == 1:
        return run(int(present[0]), slice(None))
    outs, order = [], []
    for k in present:
        rows = (row_group == k).nonzero(as_tuple=True)[0]   # (n_k,)
        outs.append(run(int(k), rows))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))                 # position of row i in the cat
    return torch.cat(outs).index_select(0, inverse)


def rows_of(arg: Any, rows: Rows, n: int) -> Any:
    """``arg[rows]`` for a per-row tensor (first dimension ``n``: x, memory, masks), ``arg``
    itself for a per-stack one (position bias ``(1, h, i, j)``, rope) or None."""
    if isinstance(arg, torch.Tensor) and arg.dim() and arg.shape[0] == n:
        return arg[rows]
    return arg


class RoutedLayer:
    """The modules of ``slot``'s groups as one callable with the layer's signature: the rows
    of group k through group k's module (one call per present group), reassembled in order.
    ``keep(slot, out)``, if given, receives the output."""

    def __init__(self, table: SlotTable, slot: str, row_task: torch.Tensor,
                 keep: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.table, self.slot, self.keep = table, slot, keep
        self.row_group = table.row_groups(slot, row_task)

    def __call__(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        n = x.shape[0]
        out = route(self.row_group, lambda k, rows: self.table.module(self.slot, k)(
            x[rows], *(rows_of(a, rows, n) for a in args)))
        if self.keep is not None:
            self.keep(self.slot, out)
        return out


def _per_row_bias(table: SlotTable, row_embed: torch.Tensor, prepared: torch.Tensor | None,
                  bias_of: Callable[[EncoderDecoder], torch.Tensor | None]) -> torch.Tensor | None:
    """The position bias of each row's embedding group. ``prepared`` is the bias the stack's
    ``prepare`` computed with group ``row_embed[0]``'s modules: kept as it is, ``(1, h, i, j)``,
    when one group holds every row (or there is no bias); else ``(b, h, i, j)`` (each group's
    table is its own parameter)."""
    groups = torch.unique(row_embed).tolist()
    if prepared is None or len(groups) == 1:
        return prepared
    biases = {e: bias_of(table.group_view("embedding", e)) for e in groups}
    return route(row_embed, lambda e, rows: biases[e].expand(len(rows), -1, -1, -1))


def encode_mixed(table: SlotTable, src: torch.Tensor, src_mask: torch.Tensor,
                 row_task: torch.Tensor, keep: tuple[str, ...] = ()
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Encoder over a mixed batch: the stack's three steps (module doc of
    :mod:`polytask.core.model.transformer`) with every slot routed.

    Args:
        src: ``(b, s)`` ids; src_mask: ``(b, s)`` bool; row_task: ``(b,)`` task index.
        keep: slot names (e.g. ``"encoder.1"``) whose outputs to return as well.
    Returns memory ``(b, s, d)`` and ``{slot: (b, s, d)}`` for the slots in ``keep``.
    """
    kept: dict[str, torch.Tensor] = {}

    def record(slot: str, out: torch.Tensor) -> None:
        if slot in keep:
            kept[slot] = out

    def embed(e: int, rows: Rows) -> torch.Tensor:
        view = table.group_view("embedding", e)
        return view.encoder.embed(view.embed(src[rows]))

    row_embed = table.row_groups("embedding", row_task)
    x = route(row_embed, embed)
    record("embedding", x)
    # masks and rope are the same for every group; the position bias is each group's own
    s = src.shape[1]
    p = table.group_view("embedding", int(row_embed[0])).encoder.prepare(src_mask)
    p.position_bias = _per_row_bias(table, row_embed, p.position_bias,
                                    lambda v: v.encoder.bias_and_rope(s, s)[0])
    layers = [RoutedLayer(table, f"encoder.{i}", row_task, record)
              for i in range(table.config.n_encoder_layers)]
    x = run_layers(x, layers, p.layer_args())
    return RoutedLayer(table, "encoder.norm", row_task, record)(x), kept


def decode_mixed(table: SlotTable, tgt_in: torch.Tensor, tgt_mask: torch.Tensor,
                 memory: torch.Tensor, src_mask: torch.Tensor, row_task: torch.Tensor
                 ) -> torch.Tensor:
    """Decoder (teacher forcing, no cache) over a mixed batch -> hidden ``(b, t, d)`` after
    each row's final norm. Shapes as in :meth:`polytask.core.model.transformer.EncoderDecoder.decode`."""

    def embed(e: int, rows: Rows) -> torch.Tensor:
        view = table.group_view("embedding", e)
        return view.decoder.embed(view.embed(tgt_in[rows]), 0)

    row_embed = table.row_groups("embedding", row_task)
    y = route(row_embed, embed)
    t = tgt_in.shape[1]
    p = table.group_view("embedding", int(row_embed[0])).decoder.prepare(tgt_mask, src_mask)
    p.position_bias = _per_row_bias(table, row_embed, p.position_bias,
                                    lambda v: v.decoder.bias_and_rope(t, t)[0])
    layers = [RoutedLayer(table, f"decoder.{i}", row_task)
              for i in range(table.config.n_decoder_layers)]
    y = run_layers(y, layers, p.layer_args(memory))
    return RoutedLayer(table, "decoder.norm", row_task)(y)

"""Row routing: run each row of a mixed-task batch through the module of its task's group.

Every layer of the backbone works row by row (attention never mixes rows), so a layer shared
by tasks {a, b} may run once on all their rows while a private layer of task c runs on c's
rows only. :func:`route` does the index_select / run / scatter-back; :func:`encode_mixed` and
:func:`decode_mixed` are the stack loops of :class:`polytask.core.model.transformer.Encoder` and ``Decoder``
with one :func:`route` per slot of the sharing plan (:mod:`polytask.heads.plan`). The per-stack inputs
(position bias, rope) come from the ``embedding`` slot, whose partition every layer refines.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # imported for annotations only: avoids an import cycle with polytask.heads.model
    from polytask.heads.model import MultiTaskModel

Rows = torch.Tensor | slice  # a LongTensor of row indices, or slice(None) for all rows


def route(row_group: torch.Tensor, run: Callable[[int, torch.Tensor | slice], torch.Tensor]
          ) -> torch.Tensor:
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


def _stack_inputs(model: "MultiTaskModel", row_task: torch.Tensor,
                  prepare: Callable[[object, torch.Tensor | slice], object]) -> dict[int, object]:
    """Per embedding group: the stack inputs (bias, rope) computed with that group's modules."""
    row_embed = model.row_groups("embedding", row_task)
    return {int(k): prepare(model.group_view("embedding", int(k)),
                            (row_embed == k).nonzero(as_tuple=True)[0])
            for k in torch.unique(row_embed).tolist()}


def _embedding_group(model: "MultiTaskModel", slot: str, k: int) -> int:
    """The embedding group whose stack inputs the rows of group ``k`` of ``slot`` use."""
    task = model.plan_task(slot, k)
    return model.plan.group_index("embedding", task)


def encode_mixed(model: "MultiTaskModel", src: torch.Tensor, src_mask: torch.Tensor,
                 row_task: torch.Tensor, keep: tuple[str, ...] = ()
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Encoder over a mixed batch.

    Args:
        src: ``(b, s)`` ids; src_mask: ``(b, s)`` bool; row_task: ``(b,)`` task index.
        keep: slot names (e.g. ``"encoder.1"``) whose outputs to return as well.
    Returns memory ``(b, s, d)`` and ``{slot: (b, s, d)}`` for the slots in ``keep``.
    """
    kept: dict[str, torch.Tensor] = {}

    def embed(k: int, rows: Rows) -> torch.Tensor:
        view = model.group_view("embedding", k)
        return view.encoder.embed(view.embed(src[rows]))

    x = route(model.row_groups("embedding", row_task), embed)
    if "embedding" in keep:
        kept["embedding"] = x
    inputs = _stack_inputs(model, row_task, lambda v, r: v.encoder.prepare(src_mask[r]))
    mask = src_mask[:, None, None, :]                                   # (b, 1, 1, s)
    for i in range(model.config.n_encoder_layers):
        slot = f"encoder.{i}"

        def layer(k: int, rows: Rows, slot: str = slot, x: torch.Tensor = x) -> torch.Tensor:
            p = inputs[_embedding_group(model, slot, k)]
            return model.module(slot, k)(x[rows], mask[rows], p.position_bias, p.rope)

        x = route(model.row_groups(slot, row_task), layer)
        if slot in keep:
            kept[slot] = x
    x = route(model.row_groups("encoder.norm", row_task),
              lambda k, rows, x=x: model.module("encoder.norm", k)(x[rows]))
    if "encoder.norm" in keep:
        kept["encoder.norm"] = x
    return x, kept


def decode_mixed(model: "MultiTaskModel", tgt_in: torch.Tensor, tgt_mask: torch.Tensor,
                 memory: torch.Tensor, src_mask: torch.Tensor, row_task: torch.Tensor
                 ) -> torch.Tensor:
    """Decoder (teacher forcing, no cache) over a mixed batch -> hidden ``(b, t, d)`` after
    each row's final norm. Shapes as in :meth:`polytask.core.model.transformer.EncoderDecoder.decode`."""

    def embed(k: int, rows: Rows) -> torch.Tensor:
        view = model.group_view("embedding", k)
        return view.decoder.embed(view.embed(tgt_in[rows]), 0)

    y = route(model.row_groups("embedding", row_task), embed)
    inputs = _stack_inputs(model, row_task,
                           lambda v, r: v.decoder.prepare(tgt_mask[r], src_mask[r]))
    self_mask = tgt_mask[:, None, None, :]                              # (b, 1, 1, t)
    cross_mask = src_mask[:, None, None, :]                             # (b, 1, 1, s)
    for i in range(model.config.n_decoder_layers):
        slot = f"decoder.{i}"

        def layer(k: int, rows: Rows, slot: str = slot, y: torch.Tensor = y) -> torch.Tensor:
            p = inputs[_embedding_group(model, slot, k)]
            return model.module(slot, k)(y[rows], memory[rows], self_mask[rows],
                                         cross_mask[rows], p.position_bias, p.rope)

        y = route(model.row_groups(slot, row_task), layer)
    return route(model.row_groups("decoder.norm", row_task),
                 lambda k, rows: model.module("decoder.norm", k)(y[rows]))

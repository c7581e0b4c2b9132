"""Classification as text by rank scoring (T0, Sanh et al. 2022, "Multitask Prompted Training
Enables Zero-Shot Task Generalization", Sec. 5: "we use rank classification ... we compute the
log-likelihood of each of the target options under the fine-tuned model and select the option
with the highest log-likelihood as the prediction").

Each label's verbalisation (its token ids, usually ending in eos) is scored by the decoder with
teacher forcing: ``score(x, y) = sum_t log p(y_t | y_<t, x)``. ``normalize="mean"`` divides by
the verbalisation's length (per-token likelihood, as GPT-3 does for some tasks, Brown et al.
2020 Sec. 2.4), which stops long labels from being penalised for their length alone.

Batched over labels: the source is encoded once, its memory repeated for the C labels, and
the b * C label sequences decoded in one call.
"""
from __future__ import annotations

from typing import Sequence

import torch
from einops import repeat

from polytask.core.model.transformer import EncoderDecoder

NORMALIZATIONS = ("sum", "mean")


def label_inputs(candidates: Sequence[Sequence[int]], bos_id: int, pad_id: int,
                 device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verbalisations -> decoder inputs ``(C, L)`` (bos + y[:-1]), their mask ``(C, L)`` and the
    targets ``(C, L)`` (y), padded on the right; mask False at padding."""
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError(f"every label needs a non-empty verbalisation, got {list(candidates)}")
    length = max(len(c) for c in candidates)
    tgt_in = torch.full((len(candidates), length), pad_id, dtype=torch.long, device=device)
    target = torch.full_like(tgt_in, pad_id)
    mask = torch.zeros_like(tgt_in, dtype=torch.bool)
    for i, ids in enumerate(candidates):
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        tgt_in[i, 0] = bos_id
        tgt_in[i, 1:len(ids)] = ids[:-1]
        target[i, :len(ids)] = ids
        mask[i, :len(ids)] = True
    return tgt_in, mask, target


def label_scores(model: EncoderDecoder, src_ids: torch.Tensor, src_mask: torch.Tensor | None,
                 candidates: Sequence[Sequence[int]], normalize: str = "sum") -> torch.Tensor:
    """Log-likelihood of every label for every row: ``(b, C)``.

    Args:
        model: anything with the EncoderDecoder interface (e.g. ``MultiTaskModel.for_task``).
        src_ids: ``(b, s)``; src_mask: ``(b, s)`` bool or None (derived from pad_id).
        candidates: C label verbalisations as token-id lists.
        normalize: ``sum`` (total log-likelihood, T0) or ``mean`` (per token).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize {normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
    config = model.config
    if src_mask is None:
        src_mask = src_ids != config.pad_id
    b, n_labels = src_ids.shape[0], len(candidates)
    tgt_in, tgt_mask, target = label_inputs(candidates, config.bos_id, config.pad_id, src_ids.device)
    memory = model.encode(src_ids, src_mask)                                     # (b, s, d)
    memory = repeat(memory, "b s d -> (b c) s d", c=n_labels)
    src_rep = repeat(src_mask, "b s -> (b c) s", c=n_labels)
    tgt_in, tgt_mask, target = (repeat(x, "c l -> (b c) l", b=b) for x in (tgt_in, tgt_mask, target))
    logits = model.logits(model.decode(tgt_in, memory, src_rep, tgt_mask))     # (b c, l, V)
    if logits.dtype in (torch.float16, torch.bfloat16):  # small probabilities need fp32
        logits = logits.float()
    token_lp = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    token_lp = token_lp.masked_fill(~tgt_mask, 0.0)                              # (b c, l)
    score = token_lp.sum(-1)
    if normalize == "mean":
        score = score / tgt_mask.sum(-1)
    return score.view(b, n_labels)


def rank_classify(model: EncoderDecoder, src_ids: torch.Tensor, src_mask: torch.Tensor | None,
                  candidates: Sequence[Sequence[int]], normalize: str = "sum"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the most likely label: returns ``(prediction (b,), scores (b, C))``; ties go to the
    first label."""
    scores = label_scores(model, src_ids, src_mask, candidates, normalize)
    return scores.argmax(dim=-1), scores


class RankHead(torch.nn.Module):
    """The head of a ``rank`` task: no parameters (the decoder and LM head do the scoring),
    only the length normalisation. ``forward(model, src_ids, src_mask, candidates)`` ->
    ``(prediction (b,), scores (b, C))`` as :func:`rank_classify`."""

    def __init__(self, normalize: str = "sum") -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"rank normalize {normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        self.normalize = normalize

    def forward(self, model: EncoderDecoder, src_ids: torch.Tensor, src_mask: torch.Tensor | None,
                candidates: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return rank_classify(model, src_ids, src_mask, candidates, self.normalize)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize!r}"

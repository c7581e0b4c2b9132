"""Beam search with GNMT's length penalty (Wu et al. 2016, "Google's Neural Machine
Translation System", section 7, eq. 14).

A finished hypothesis Y (its tokens up to and including eos) scores
``log P(Y | X) / lp(|Y|)`` with ``lp(n) = ((5 + n) / 6) ** alpha``; ``alpha = 0`` is the plain
log-probability. (Hugging Face divides by ``n ** alpha`` instead; we follow the paper.)
GNMT's coverage penalty is not implemented.

Each of the ``b`` sources keeps ``num_beams`` live prefixes, laid out as ``b * num_beams`` rows
(row ``i * num_beams + j`` is beam j of source i). Every step scores all ``num_beams * V``
one-token extensions of a source's beams and takes the best ``2 * num_beams``: those ending
in eos join the source's finished hypotheses, the best ``num_beams`` others become the next
beams and the KV cache is reordered to their parents with ``cache.reorder``.

Stopping is exact, not a heuristic: a source is done when it has ``num_beams`` finished
hypotheses and no live beam can still beat the worst of them. Log-probabilities only go down
as a prefix grows, so a live beam's final score is at most ``logP_now / lp(n)`` maximised over
the lengths ``n`` it can still reach; ``lp`` is monotone in ``n``, so the two end points bound
it. With enough beams to keep every prefix alive the search is therefore exhaustive
(tests/core/decoding/test_generation.py checks it against brute-force enumeration).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from polytask.core.accelerate import accelerated
from polytask.core.decoding.state import start_decoding


def gnmt_length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """``((5 + length) / 6) ** alpha`` (Wu et al. 2016, eq. 14)."""
    return ((5 + length) / 6) ** alpha


class _Hypotheses:
    """The best ``size`` finished hypotheses of one source: (score, tokens) pairs."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[float, torch.Tensor]] = []

    def add(self, score: float, tokens: torch.Tensor) -> None:
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: item[0], reverse=True)
        del self.items[self.size:]

    def worst(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.size else float("-inf")

    def best(self) -> tuple[float, torch.Tensor]:
        return self.items[0]


@torch.no_grad()
def beam_search(model: Any, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None, *,
                num_beams: int = 4, max_new_tokens: int = 64, length_penalty: float = 1.0,
                bos_id: int, eos_id: int, pad_id: int,
                use_cache: bool = True, accelerate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search for a batch of sources (model interface: :mod:`polytask.core.decoding.generation`).

    Args:
        src_ids: ``(b, s)``; src_mask: ``(b, s)`` bool or None (``src_ids != pad_id``).
        num_beams: beams per source (1 = greedy when ``length_penalty=0``).
        max_new_tokens: longest hypothesis; live beams are finished there without eos.
        length_penalty: GNMT's alpha.
        use_cache: KV cache reordered per step, or full re-decoding (the slow twin).
        accelerate: run under :func:`polytask.core.accelerate.accelerated` with the fused
            decoding step, or the plain modules (False, the twin).

    Returns:
        ``tokens`` ``(b, t)``: each source's best hypothesis (without the start token, padded
        with ``pad_id`` after eos; ``t <= max_new_tokens``) and ``scores`` ``(b,)``: its
        length-penalised log-probability.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams ({num_beams}) and max_new_tokens ({max_new_tokens}) "
                         "must be >= 1")
    with accelerated(model, inference=True) if accelerate else contextlib.nullcontext():
        return _search(model, src_ids, src_mask, num_beams, max_new_tokens, length_penalty,
                       bos_id, eos_id, pad_id, use_cache, accelerate)


def _search(model: Any, src_ids: torch.Tensor, src_mask: torch.Tensor | None, k: int,
            max_new_tokens: int, length_penalty: float, bos_id: int, eos_id: int, pad_id: int,
            use_cache: bool, step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, device = src_ids.shape[0], src_ids.device
    state = start_decoding(model, src_ids, src_mask, pad_id, use_cache, step=step)
    # The encoder ran once on b rows; every beam of a source shares its memory. The cache is
    # still empty and fills with b * k rows on the first step.
    state.memory = state.memory.repeat_interleave(k, dim=0)  # (b*k, s, d)
    state.src_mask = state.src_mask.repeat_interleave(k, dim=0)  # (b*k, s)

    tokens = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
    beam_scores = torch.full((batch, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished = [_Hypotheses(k) for _ in range(batch)]
    done = [False] * batch

    for step in range(1, max_new_tokens + 1):  # step = length of the hypotheses made now
        log_probs = F.log_softmax(state.next_token_logits(tokens), dim=-1)  # (b*k, V)
        vocab = log_probs.shape[-1]
        candidates = beam_scores[:, :, None] + log_probs.view(batch, k, vocab)  # (b, k, V)
        top_scores, top_index = candidates.view(batch, k * vocab).topk(
            min(2 * k, k * vocab), dim=1)  # (b, 2k): at most k of them end in eos

        next_scores = torch.full((batch, k), float("-inf"), device=device)
        next_tokens = torch.full((batch, k), pad_id, dtype=torch.long, device=device)
        parents = torch.arange(batch * k, device=device).view(batch, k).clone()
        for i in range(batch):
            if done[i]:
                continue  # keeps its rows, fed pad, scores -inf
            n_live = 0
            for score, index in zip(top_scores[i].tolist(), top_index[i].tolist()):
                if score == float("-inf"):
                    break
                parent, token = i * k + index // vocab, index % vocab
                if token == eos_id:
                    hypothesis = torch.cat([tokens[parent, 1:], tokens.new_tensor([eos_id])])
                    finished[i].add(score / gnmt_length_penalty(step, length_penalty), hypothesis)
                    continue
                next_scores[i, n_live], next_tokens[i, n_live] = score, token
                parents[i, n_live] = parent
                n_live += 1
                if n_live == k:
                    break
            done[i] = _is_done(finished[i], next_scores[i].max().item(), step, max_new_tokens,
                               length_penalty)

        parents = parents.view(-1)
        tokens = torch.cat([tokens.index_select(0, parents), next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores
        if all(done):
            break
        state.reorder(parents)

    # Sources still searching at max length: their live beams finish without eos.
    for i in range(batch):
        if not done[i]:
            for j in range(k):
                if beam_scores[i, j] > float("-inf"):
                    finished[i].add(
                        beam_scores[i, j].item() / gnmt_length_penalty(step, length_penalty),
                        tokens[i * k + j, 1:])
    return _pad_best(finished, pad_id, device)


def _is_done(hyps: _Hypotheses, best_live: float, step: int, max_new_tokens: int,
             alpha: float) -> bool:
    """True when no live beam (log-prob ``best_live`` at length ``step``) can beat the worst
    kept hypothesis; see the module docstring for why the end points bound it."""
    if best_live == float("-inf"):
        return len(hyps.items) > 0
    if len(hyps.items) < hyps.size:
        return False
    reachable = (min(step + 1, max_new_tokens), max_new_tokens)  # at max length: finish now
    bound = max(best_live / gnmt_length_penalty(n, alpha) for n in reachable)
    return hyps.worst() >= bound


def _pad_best(finished: list[_Hypotheses], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    best = [hyps.best() for hyps in finished]
    width = max(len(tokens) for _, tokens in best)
    out = torch.full((len(best), width), pad_id, dtype=torch.long, device=device)
    for i, (_, tokens) in enumerate(best):
        out[i, :len(tokens)] = tokens
    scores = torch.tensor([score for score, _ in best], device=device)
    return out, scores

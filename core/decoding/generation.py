"""Autoregressive decoding for encoder-decoder models: greedy, sampling and (in
:mod:`polytask.core.decoding.beam`) beam search, with or without a KV cache.

The model is duck-typed (:mod:`polytask.core.decoding.state`): an
:class:`polytask.core.model.transformer.EncoderDecoder`, a multi-task model's
``for_task(name)`` view (with any PEFT applied, :mod:`polytask.core.peft`).

``accelerate=True`` (the default) runs the call inside
:func:`polytask.core.accelerate.accelerated` with ``inference=True`` and takes the cached steps
through :class:`polytask.core.decoding.step.DecodingStep`; ``accelerate=False`` runs the plain
modules, the obvious twin (the same tokens; tests/core/decoding/test_step.py).

The encoder runs once. With ``use_cache=True`` each step feeds the decoder only the tokens the
cache has not seen (one per step), so the self-attention cache grows by one entry per step;
``use_cache=False`` is the slow, obvious twin that re-runs the decoder over the whole prefix.
The two give the same tokens (tests/core/decoding/test_generation.py).

Sampling follows Holtzman et al. 2020 ("The Curious Case of Neural Text Degeneration"):
temperature, then top-k, then nucleus (top-p) filtering, then a draw from the renormalised
distribution with an optional ``torch.Generator`` for reproducibility.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from polytask.core.accelerate import accelerated
from polytask.core.decoding.beam import beam_search
from polytask.core.decoding.state import DecoderState, start_decoding

METHODS = ("greedy", "beam", "sample")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the ``k``-th largest of its row to -inf; ``k=0`` keeps all.
    ``logits`` ``(b, V)``. Ties with the k-th value are kept."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, eq. 3): keep the smallest set of most likely
    tokens whose probability mass is >= ``p``; the rest get -inf. ``logits`` ``(b, V)``.

    A token is kept when the mass of the tokens strictly more likely than it (in sorted order)
    is still < p, so the most likely token is always kept and ``p=1`` keeps everything.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive cumulative sum
    keep_sorted = mass_before < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def _greedy_or_sample(state: DecoderState, batch: int, device: torch.device, *,
                      max_new_tokens: int, sample: bool, temperature: float, top_k: int,
                      top_p: float, bos_id: int, eos_id: int, pad_id: int,
                      generator: torch.Generator | None) -> torch.Tensor:
    tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = state.next_token_logits(tokens)  # (b, V)
        if sample:
            logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            next_token = logits.argmax(dim=-1)
        next_token = next_token.masked_fill(finished, pad_id)  # rows already done: pad
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= next_token == eos_id
        if bool(finished.all()):
            break
    return tokens[:, 1:]


def _resolve_ids(model: Any, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None) -> tuple[int, int, int]:
    """Explicit ids win; otherwise take them from ``model.config`` (a ModelConfig)."""
    config = getattr(model, "config", None)
    ids = []
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if value is None:
            if config is None or not hasattr(config, name):
                raise ValueError(f"{name} not given and the model has no config.{name}")
            value = getattr(config, name)
        ids.append(int(value))
    return ids[0], ids[1], ids[2]


@torch.no_grad()
def generate(model: Any, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 64, method: str = "greedy", num_beams: int = 4,
             length_penalty: float = 1.0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, bos_id: int | None = None, eos_id: int | None = None,
             pad_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, accelerate: bool = True) -> torch.Tensor:
    """Generate target token ids for a batch of sources.

    Args:
        model: duck-typed encoder-decoder (module docstring); put it in ``eval()`` mode first
            if it has dropout.
        src_ids: ``(b, s)`` long source ids.
        src_mask: ``(b, s)`` bool, True = real token; None: ``src_ids != pad_id``.
        max_new_tokens: most tokens generated per row (eos included).
        method: ``greedy``, ``beam`` (:func:`polytask.core.decoding.beam.beam_search`) or ``sample``.
        num_beams, length_penalty: beam search only; the penalty is GNMT's
            ``((5 + |Y|) / 6) ** length_penalty`` (Wu et al. 2016, eq. 14), 0 = none.
        temperature, top_k, top_p: sampling only (``top_k=0`` and ``top_p=1`` disable).
        bos_id, eos_id, pad_id: decoder start, end and padding ids; None: ``model.config``'s.
        use_cache: KV-cache decoding (fast) or full re-decoding every step (slow twin).
        generator: ``torch.Generator`` for reproducible sampling.
        accelerate: the CPU accelerations and the fused decoding step (module doc), or the
            plain modules (False, the twin).

    Returns:
        ``(b, t)`` long with ``t <= max_new_tokens``: the generated tokens without the start
        token, each row ending at its first eos and padded with ``pad_id`` after it. Decoding
        stops once every row has produced eos.
    """
    if method not in METHODS:
        raise ValueError(f"unknown generation method {method!r}; choices: {', '.join(METHODS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    if num_beams < 1:
        raise ValueError(f"num_beams ({num_beams}) must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0; use method='greedy' for 0")
    if top_k < 0:
        raise ValueError(f"top_k ({top_k}) must be >= 0 (0 disables it)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1]")
    bos_id, eos_id, pad_id = _resolve_ids(model, bos_id, eos_id, pad_id)
    if method == "beam":
        tokens, _ = beam_search(model, src_ids, src_mask, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                                use_cache=use_cache, accelerate=accelerate)
        return tokens
    with accelerated(model, inference=True) if accelerate else contextlib.nullcontext():
        state = start_decoding(model, src_ids, src_mask, pad_id, use_cache, step=accelerate)
        return _greedy_or_sample(
            state, src_ids.shape[0], src_ids.device, max_new_tokens=max_new_tokens,
            sample=method == "sample", temperature=temperature, top_k=top_k, top_p=top_p,
            bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, generator=generator)


@torch.no_grad()
def sequence_log_probs(model: Any, src_ids: torch.Tensor, tokens: torch.Tensor,
                       src_mask: torch.Tensor | None = None, *, bos_id: int, eos_id: int,
                       pad_id: int, accelerate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced score of generated ``tokens`` ``(b, t)`` (as returned by
    :func:`generate`): the sum of log-probabilities of each row's tokens up to and including
    its first eos (all ``t`` tokens if it has none), and that length.

    Returns ``(log_prob (b,), length (b,))``; used to compare decoding methods under one score.
    """
    with accelerated(model, inference=True) if accelerate else contextlib.nullcontext():
        state = start_decoding(model, src_ids, src_mask, pad_id, use_cache=False)
        start = torch.full((tokens.shape[0], 1), bos_id, dtype=torch.long, device=tokens.device)
        tgt_in = torch.cat([start, tokens[:, :-1]], dim=1)
        hidden = model.decode(tgt_in, state.memory, src_mask=state.src_mask,
                              tgt_mask=torch.ones_like(tgt_in, dtype=torch.bool))
        log_probs = F.log_softmax(model.logits(hidden).float(), dim=-1)  # (b, t, V)
    token_lp = log_probs.gather(-1, tokens[..., None])[..., 0]  # (b, t)
    is_eos = tokens == eos_id
    # a position counts if no eos came strictly before it
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    counted = ~eos_before
    return (token_lp * counted).sum(dim=1), counted.sum(dim=1)

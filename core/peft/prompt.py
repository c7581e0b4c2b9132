"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for
Parameter-Efficient Prompt Tuning", section 2): ``n`` learned embeddings are prepended to the
embedded encoder input; the backbone stays frozen.

:class:`PromptTuning` wraps a model that exposes ``embed(ids) -> (b, s, d)`` and
``encoder(x, src_mask) -> (b, s, d)`` (as :class:`polytask.core.model.transformer.EncoderDecoder` does) and
offers the generation interface (``encode``, ``decode``, ``logits``, ``new_cache``,
``forward``), so :func:`polytask.core.decoding.generation.generate` and training code use it unchanged.

How it composes with decoding: ``encode`` returns memory ``(b, n + s, d)``, whose first ``n``
positions are the prompt. Callers keep passing the *original* ``src_mask`` ``(b, s)`` to
``decode``; the wrapper prepends ``n`` True columns so cross-attention sees the prompt
positions too. (A mask that already covers ``n + s`` positions is passed through.) With
absolute positions the prompt takes positions ``0..n-1`` and the source shifts by ``n``; with
T5's relative positions, as in the paper, nothing shifts in meaning.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PromptTuning(nn.Module):
    """``model`` with ``n_tokens`` trainable prompt embeddings (``prompt`` ``(n, d)``).

    Args:
        model: the backbone (see the module docstring for what it must expose).
        n_tokens: prompt length ``n`` (Lester et al. use 1-150; 20 is a good default).
        init_from_vocab: initialise each prompt vector as the embedding of a random token,
            the paper's "sampled vocab" initialisation (its section 3.2), otherwise normal
            with the embeddings' standard deviation.
        pad_id: for ``src_mask=None``; default ``model.config.pad_id``.
    """

    def __init__(self, model: nn.Module, n_tokens: int = 20, *, init_from_vocab: bool = True,
                 pad_id: int | None = None) -> None:
        super().__init__()
        for needed in ("embed", "encoder", "decode", "logits", "new_cache"):
            if not hasattr(model, needed):
                raise ValueError(f"prompt tuning needs a model with .{needed}; "
                                 f"{type(model).__name__} has none")
        if n_tokens <= 0:
            raise ValueError(f"prompt n_tokens ({n_tokens}) must be positive")
        self.model = model
        self.n_tokens = n_tokens
        config = getattr(model, "config", None)
        self.pad_id = pad_id if pad_id is not None else getattr(config, "pad_id", 0)
        vocab_size = getattr(config, "vocab_size", None)
        with torch.no_grad():
            probe = model.embed(torch.zeros(1, 1, dtype=torch.long))  # (1, 1, d): size, dtype
            if init_from_vocab and vocab_size:
                ids = torch.randint(0, vocab_size, (1, n_tokens), device=probe.device)
                init = model.embed(ids)[0].clone()
            else:
                init = torch.randn(n_tokens, probe.shape[-1], device=probe.device,
                                   dtype=probe.dtype) * 0.02
        self.prompt = nn.Parameter(init)  # (n, d)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def _src_mask(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        return src_ids != self.pad_id if src_mask is None else src_mask

    def extend_mask(self, src_mask: torch.Tensor) -> torch.Tensor:
        """``(b, s)`` -> ``(b, n + s)`` with the prompt positions real."""
        ones = torch.ones(src_mask.shape[0], self.n_tokens, dtype=torch.bool,
                          device=src_mask.device)
        return torch.cat([ones, src_mask], dim=1)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``src_ids`` ``(b, s)`` -> memory ``(b, n + s, d)``."""
        src_mask = self._src_mask(src_ids, src_mask)
        x = self.model.embed(src_ids)  # (b, s, d)
        prompt = self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)  # (b, n, d)
        return self.model.encoder(torch.cat([prompt, x], dim=1), self.extend_mask(src_mask))

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor,
               src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
               cache: Any = None) -> torch.Tensor:
        """As the backbone's ``decode``; ``src_mask`` may be the original ``(b, s)`` mask."""
        if src_mask is not None and src_mask.shape[1] != memory.shape[1]:
            if src_mask.shape[1] + self.n_tokens != memory.shape[1]:
                raise ValueError(
                    f"src_mask covers {src_mask.shape[1]} positions but memory has "
                    f"{memory.shape[1]} = {self.n_tokens} prompt + source positions")
            src_mask = self.extend_mask(src_mask)
        return self.model.decode(tgt_ids, memory, src_mask, tgt_mask, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def new_cache(self) -> Any:
        return self.model.new_cache()

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``(b, s)``, ``(b, t)`` -> logits ``(b, t, V)``."""
        src_mask = self._src_mask(src_ids, src_mask)
        memory = self.encode(src_ids, src_mask)
        return self.logits(self.decode(tgt_ids, memory, src_mask, tgt_mask))

"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for
Parameter-Efficient Prompt Tuning", section 2): ``n`` learned embeddings, *virtual tokens*, are
prepended to the embedded encoder input; the backbone stays frozen.

**Virtual token ids.** :class:`PromptEmbedding` extends a frozen token embedding of ``V`` rows
by ``m`` trainable rows, looked up by the ids ``V .. V + m - 1``. Prompt tuning prepends a
task's ``n`` virtual ids to every source and marks them real in the source mask, so the
encoder runs over ``n + s`` positions and everything that reads ``(memory, src_mask)`` — the
decoder's cross-attention, a classifier head's pooling, the adversarial discriminator — sees the
prompt as ordinary source positions, as in the paper, where the decoder attends to the
prompt too.

**Where the ids are prepended** (:func:`prompt_tune`), by forward pre-hooks (the mechanism of
``torch.nn.utils.prune``), so the model's own code runs unchanged:

* a multi-task model's ``forward(batch)`` — training, and evaluation of classifier tasks:
  :class:`PrefixSources` prepends each row's task's ids to ``batch.src`` and ``src_mask``;
* a task view (an EncoderDecoder: generation, rank classification, ONNX export):
  :class:`PrependPrompt` on ``view.encoder`` prepends the embedded ids to the token embeddings,
  :class:`ExtendSourceMask` on ``view.decoder`` widens a ``(b, s)`` source mask to the
  ``(b, n + s)`` memory, so callers keep passing the source's own mask.

Both paths embed the same ids with the same embedding, so a task's outputs agree through either
(tests/experiments/test_peft_runs.py). A hooked view decodes through its modules: the fused
decoding step (:mod:`polytask.core.decoding.step`) skips models with hooks.

**Per task or shared** (``per_task``): ``True`` (the default) gives every task its own ``n``
virtual tokens: Lester et al.'s mixed-task batches, one frozen model and a prompt per task.
``False`` gives the tasks that share a token embedding one prompt. Tasks with private
embeddings (sharing ``none`` or ``soft``) have their own prompt either way.

**Initialisation** (``init_from_vocab``): each virtual token starts as the embedding of a random
real token (pad, bos and eos excepted), the paper's "sampled vocab" initialisation (its section
3.2 samples from the 5,000 most common tokens; polytask's vocabularies are about that size);
otherwise normal with the embedding's standard deviation.

**Positions**: with absolute positions the prompt takes positions ``0 .. n-1`` and the source
shifts by ``n`` (``n`` + the source length must fit ``max_length``); with T5's relative
positions, as in the paper, nothing shifts in meaning.

**Not covered**: cross-stitch units (their task view runs every column's encoder directly,
past the hooks; refused), and ``MultiTaskModel.predict_class`` on a *classifier* task, which
encodes without calling the model's forward and so without the prompt (evaluation calls
forward for classifier tasks; rank tasks go through the hooked view).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from polytask.core.peft.modules import replace_module, task_views


class PromptEmbedding(nn.Module):
    """A frozen token embedding (``base``, ``V`` rows) plus ``m`` trainable rows (``prompt``
    ``(m, d)``) that the ids ``V .. V + m - 1`` look up: ids ``(...)`` -> ``(..., d)``.

    Args:
        base: the token embedding; its weight is frozen here.
        n_rows: ``m``, the number of virtual tokens.
        init_from_vocab: start each row as a random real token's embedding, else normal with
            the embedding's standard deviation (module docstring).
        special_ids: ids the vocabulary initialisation never picks (pad, bos, eos).

    ``weight`` is the base weight (``V`` rows), so code that reads the token embedding, or an
    LM head tied to it, keeps working.
    """

    def __init__(self, base: nn.Embedding, n_rows: int, *, init_from_vocab: bool = True,
                 special_ids: tuple[int, ...] = ()) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"prompt tuning extends an nn.Embedding, got {type(base).__name__}")
        if n_rows <= 0:
            raise ValueError(f"prompt tuning needs at least one virtual token, got {n_rows}")
        self.base = base
        base.weight.requires_grad_(False)
        self.vocab_size = base.num_embeddings
        weight = base.weight.detach()
        if init_from_vocab:
            choices = [i for i in range(self.vocab_size) if i not in special_ids] or [0]
            picks = torch.tensor(choices)[torch.randint(len(choices), (n_rows,))]
            init = weight[picks.to(weight.device)].clone()
        else:
            init = torch.randn(n_rows, weight.shape[1], device=weight.device,
                               dtype=weight.dtype) * weight.std()
        self.prompt = nn.Parameter(init)  # (m, d)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.vocab_size
        real = self.base(ids.masked_fill(virtual, 0))                          # (..., d)
        rows = (ids - self.vocab_size).clamp(0, self.prompt.shape[0] - 1)
        return torch.where(virtual.unsqueeze(-1), self.prompt[rows].to(real.dtype), real)


def extend_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``(b, s)`` -> ``(b, n + s)`` with the ``n`` prompt positions real. (Built from ``mask``'s
    own tensors, so an ONNX trace keeps the batch size dynamic.)"""
    return torch.cat([torch.ones_like(mask[:, :1]).expand(-1, n), mask], dim=1)


def _get(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _put(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        return (*args[:index], value, *args[index + 1:]), kwargs
    return args, {**kwargs, name: value}


class PrependPrompt:
    """Forward pre-hook of a view's ``Encoder``: ``forward(tokens (b, s, d), src_mask (b, s))``
    runs on ``(b, n + s, d)`` and ``(b, n + s)``, the task's virtual tokens first."""

    def __init__(self, view: nn.Module, ids: torch.Tensor) -> None:
        self.view, self.ids = view, ids  # ids (n,)

    def __call__(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tokens, src_mask = _get(args, kwargs, 0, "tokens"), _get(args, kwargs, 1, "src_mask")
        prompt = self.view.embed(self.ids.to(tokens.device)).to(tokens.dtype)   # (n, d)
        tokens = torch.cat([prompt.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        args, kwargs = _put(args, kwargs, 0, "tokens", tokens)
        return _put(args, kwargs, 1, "src_mask", extend_mask(src_mask, len(self.ids)))


class ExtendSourceMask:
    """Forward pre-hook of a view's ``Decoder``: a ``(b, s)`` ``src_mask`` given with a memory
    of ``n + s`` positions is widened to cover the prompt (a mask that already covers the
    memory passes through)."""

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens

    def __call__(self, decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        memory, src_mask = _get(args, kwargs, 1, "memory"), _get(args, kwargs, 3, "src_mask")
        if src_mask is not None and src_mask.shape[1] + self.n_tokens == memory.shape[1]:
            args, kwargs = _put(args, kwargs, 3, "src_mask", extend_mask(src_mask, self.n_tokens))
        return args, kwargs


class PrefixSources:
    """Forward pre-hook of a multi-task model whose ``forward(batch)`` takes a
    :class:`polytask.core.data.batch.Batch`: row ``i`` gets its task's virtual ids
    ``table[batch.task_ids[i]]`` in front of its source, marked real."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (k tasks, n)

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        batch = _get(args, kwargs, 0, "batch")
        ids = self.table.to(batch.src.device)[batch.task_ids]                  # (b, n)
        batch = replace(batch, src=torch.cat([ids, batch.src], dim=1),
                        src_mask=extend_mask(batch.src_mask, ids.shape[1]))
        return _put(args, kwargs, 0, "batch", batch)


def prompt_tune(model: nn.Module, n_tokens: int = 20, *, init_from_vocab: bool = True,
                per_task: bool = True) -> torch.Tensor:
    """Install prompt tuning in ``model`` (an EncoderDecoder, or a multi-task model: see
    :mod:`polytask.core.peft.modules`) in place, as the module docstring describes.

    Returns the virtual ids ``(k, n)`` of each task view (``k = 1`` for an EncoderDecoder).
    Freezing is :func:`polytask.core.peft.apply_peft`'s job.
    """
    if n_tokens <= 0:
        raise ValueError(f"prompt n_tokens ({n_tokens}) must be positive")
    if getattr(model, "cross_stitch", None) is not None:
        raise ValueError("prompt tuning does not support cross-stitch units: a cross-stitch "
                         "task view encodes through every column's layers directly, where the "
                         "virtual tokens are not prepended; use sharing.cross_stitch = false")
    views = task_views(model) or [model]
    for view in views:
        if isinstance(getattr(view, "embed_tokens", None), PromptEmbedding):
            raise ValueError("the model is prompt-tuned already")
        for needed in ("embed_tokens", "embed", "encoder", "decoder"):
            if not hasattr(view, needed):
                raise ValueError(f"prompt tuning needs an encoder-decoder with .{needed}; "
                                 f"{type(view).__name__} has none")
    groups: dict[int, list[int]] = {}  # one token embedding -> the views that use it
    for i, view in enumerate(views):
        groups.setdefault(id(view.embed_tokens), []).append(i)
    table = torch.empty(len(views), n_tokens, dtype=torch.long)
    for members in groups.values():
        old, config = views[members[0]].embed_tokens, views[members[0]].config
        n_sets = len(members) if per_task else 1
        special = tuple(getattr(config, f"{k}_id", -1) for k in ("pad", "bos", "eos"))
        new = PromptEmbedding(old, n_sets * n_tokens, init_from_vocab=init_from_vocab,
                              special_ids=special)
        replace_module(model, old, new)
        for j, i in enumerate(members):
            first = old.num_embeddings + (j if per_task else 0) * n_tokens
            table[i] = torch.arange(first, first + n_tokens)
    for view, ids in zip(views, table):
        view.encoder.register_forward_pre_hook(PrependPrompt(view, ids), with_kwargs=True)
        view.decoder.register_forward_pre_hook(ExtendSourceMask(n_tokens), with_kwargs=True)
    if task_views(model):
        model.register_forward_pre_hook(PrefixSources(table), with_kwargs=True)
    return table

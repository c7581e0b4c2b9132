"""Plan slots <-> the modules of a :class:`polytask.core.model.transformer.EncoderDecoder`.

``encoder.i`` / ``decoder.i`` are ``encoder.layers[i]`` / ``decoder.layers[i]``;
``encoder.norm`` / ``decoder.norm`` the stacks' final norms; ``lm_head`` the output projection
(its weight *is* the token embedding when ``tie_embeddings``). The ``embedding`` slot holds
everything below the first layer: the token embedding and each stack's position module and
embedding norm (T5's relative position bias lives there too: one table per stack, used by all
the stack's layers, so every layer partition of a plan refines the embedding's).
"""
from __future__ import annotations

from torch import nn

from polytask.core.model.transformer import EncoderDecoder


class InputModules(nn.Module):
    """The ``embedding`` slot of one backbone: token embedding, position modules, embedding norms."""

    def __init__(self, backbone: EncoderDecoder) -> None:
        super().__init__()
        self.embed_tokens = backbone.embed_tokens
        self.encoder_positions = backbone.encoder.positions
        self.encoder_embedding_norm = backbone.encoder.embedding_norm
        self.decoder_positions = backbone.decoder.positions
        self.decoder_embedding_norm = backbone.decoder.embedding_norm

    def install(self, backbone: EncoderDecoder) -> None:
        backbone.embed_tokens = self.embed_tokens
        backbone.encoder.positions = self.encoder_positions
        backbone.encoder.embedding_norm = self.encoder_embedding_norm
        backbone.decoder.positions = self.decoder_positions
        backbone.decoder.embedding_norm = self.decoder_embedding_norm


def get_slot(backbone: EncoderDecoder, slot: str) -> nn.Module:
    """The module of ``backbone`` at plan slot ``slot`` (a fresh container for ``embedding``)."""
    if slot == "embedding":
        return InputModules(backbone)
    if slot == "lm_head":
        return backbone.lm_head
    stack, what = slot.split(".")
    return getattr(backbone, stack).norm if what == "norm" else getattr(backbone, stack).layers[int(what)]


def set_slot(backbone: EncoderDecoder, slot: str, module: nn.Module) -> None:
    """Make ``backbone`` use ``module`` at ``slot`` (the group's one shared object)."""
    if slot == "embedding":
        module.install(backbone)  # type: ignore[union-attr]
    elif slot == "lm_head":
        backbone.lm_head = module
    else:
        stack, what = slot.split(".")
        if what == "norm":
            getattr(backbone, stack).norm = module
        else:
            getattr(backbone, stack).layers[int(what)] = module

"""PEFT and freezing applied to a run's model (:func:`adapt`), and which tensors a run's weight
files hold (:func:`weight_names`: all of them, or with ``train.save_base: false`` only what the
``init:`` checkpoint lacks). Training (:func:`polytask.experiments.build.build_parts`) and
loading a run (:func:`polytask.experiments.runs.load_run`) both call :func:`adapt` before any
weights load, so the modules match the saved tensors."""
from __future__ import annotations

from polytask.core.peft import PEFT_METHODS, PromptEmbedding, apply_peft, peft_options
from polytask.core.peft.frozen import FrozenLinear
from polytask.core.peft.modules import backbone
from polytask.core.training.checkpoint import model_state
from polytask.core.training.optim import freeze
from polytask.experiments.config import RunConfig
from polytask.heads.model import MultiTaskModel


def adapt(model: MultiTaskModel, cfg: RunConfig) -> list[str]:
    """Apply ``train.peft``, then ``train.train_only`` / ``train.train_top_layers``, to a freshly
    built ``model`` in place; returns the names of the trainable parameters. Training calls it
    (:func:`build_parts`), and so does loading a run (:func:`polytask.experiments.runs.load_run`),
    before the weights load, so that the modules match the saved tensors.

    One order, two questions:

    1. *What* trains in the backbone: ``train.peft`` (:mod:`polytask.core.peft`). LoRA and
       adapters wrap their layers, prompt tuning adds virtual tokens, BitFit picks the biases;
       every other backbone weight is frozen. The modules outside the backbone — classifier
       and rank heads, the adversarial discriminator, cross-stitch units — are new and
       randomly initialised, and stay trainable.
    2. *Where* training happens: ``train.train_only`` (parameters whose name contains one of the
       given parts) and ``train.train_top_layers`` (the top N layers of each stack, the heads,
       final norms and LM head; not the embeddings). They only ever *freeze* what lies
       elsewhere and never unfreeze what PEFT froze: ``peft: {method: lora}`` with
       ``train_top_layers: 1`` trains LoRA in the top layer of each stack, and the heads.
       (Reading it as "LoRA, and the top layers fully" would quietly turn a LoRA run into
       partial full fine-tuning.) ``train_only`` also freezes heads it does not name.

    Refused, with the reason: freezing options that freeze every parameter the PEFT method
    trains (the method would train nothing: prompt tuning with ``train_top_layers``, whose
    frozen embedding holds the prompt; LoRA with ``train_only: [heads]``); a ``train.peft``
    without ``method``; prompt tuning whose virtual tokens and ``data.max_source_len`` overflow
    learned or sinusoidal positions (``model.max_length``); prompt tuning with
    ``sharing.cross_stitch``; ``train.save_base: false`` with nothing of the backbone frozen
    (its weight files would hold every tensor anyway).
    """
    t = cfg.train
    peft = _apply_peft(model, cfg) if t.peft else None
    if t.train_top_layers is not None or t.train_only:
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        n_layers = {"encoder": cfg.model.n_encoder_layers, "decoder": cfg.model.n_decoder_layers}
        where = set(freeze(model, train_top_layers=t.train_top_layers, train_only=t.train_only,
                           n_layers=n_layers))
        for name, p in model.named_parameters():
            p.requires_grad_(before[name] and name in where)
        if peft is not None and not where & set(peft):
            option = (f"train.train_top_layers = {t.train_top_layers}"
                      if t.train_top_layers is not None else f"train.train_only = {t.train_only}")
            raise ValueError(
                f"train.peft (method {t.peft['method']!r}) and {option} contradict: the freezing "
                f"option freezes every parameter {t.peft['method']} trains (e.g. {peft[0]}), so "
                f"the method would train nothing; freezing options only ever narrow what PEFT "
                f"trains, never unfreeze base weights. Drop one of them")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"train.peft = {t.peft} with the freezing options leaves nothing to train")
    if not t.save_base and len(trained_names(model)) == len(model_state(model)):
        raise ValueError(
            f"train.save_base = false saves only what is not rebuilt from the init: checkpoint, "
            f"but nothing of the backbone is frozen (train.peft = {t.peft or {}}, "
            f"train.train_only = {t.train_only}, train.train_top_layers = "
            f"{t.train_top_layers}), so it would save every tensor anyway; choose a PEFT method "
            f"or a freezing option, or train.save_base = true")
    return trainable


ABSOLUTE_POSITIONS = ("learned", "sinusoidal")


def _apply_peft(model: MultiTaskModel, cfg: RunConfig) -> list[str]:
    """``train.peft`` validated (its method and options) and applied; returns what it trains."""
    options = dict(cfg.train.peft)
    method = options.pop("method", None)
    if method is None:
        raise ValueError(f"train.peft = {cfg.train.peft} needs a method: one of "
                         f"{', '.join(PEFT_METHODS)}")
    parsed = peft_options(method, options, "train.peft")
    if method == "prompt" and cfg.model.positions in ABSOLUTE_POSITIONS:
        longest = parsed.n_tokens + cfg.data.max_source_len
        if longest > cfg.model.max_length:
            raise ValueError(
                f"train.peft.n_tokens = {parsed.n_tokens} virtual tokens before sources of up to "
                f"data.max_source_len = {cfg.data.max_source_len} tokens make {longest} "
                f"positions, more than model.max_length = {cfg.model.max_length} of the "
                f"{cfg.model.positions} positions; lower one or raise model.max_length")
    return apply_peft(model, method, **options)


#: PEFT modules that wrap a frozen ``base`` module; what they add besides it is theirs
PEFT_WRAPPERS = (FrozenLinear, PromptEmbedding)


def trained_names(model: MultiTaskModel) -> list[str]:
    """The tensors (names of :func:`polytask.core.training.checkpoint.model_state`) that a
    ``train.save_base: false`` run saves, after :func:`adapt`: every trainable parameter; all
    of every module outside the backbone (heads, discriminator, cross-stitch units: new, so
    not in the base, whether they train or not); and the buffers of PEFT's modules (LoRA,
    adapters, prompts) outside their frozen ``base``. The rest — the frozen backbone — is
    what the ``init:`` checkpoint gives back."""
    tensors = model.state_dict(keep_vars=True)
    inside = {id(t) for root in backbone(model) for t in (*root.parameters(), *root.buffers())}
    added = {id(b) for m in model.modules() if isinstance(m, PEFT_WRAPPERS)
             for name, b in m.named_buffers() if not name.startswith("base.")}
    keep = {name for name, t in tensors.items()
            if t.requires_grad or id(t) not in inside or id(t) in added}
    return [name for name in model_state(model) if name in keep]


def weight_names(cfg: RunConfig, model: MultiTaskModel) -> list[str] | None:
    """What the run's weight files hold: ``None`` (the whole model) or, with
    ``train.save_base: false``, :func:`trained_names`."""
    return None if cfg.train.save_base else trained_names(model)

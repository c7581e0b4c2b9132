"""Load Hugging Face T5 and BART weights into a polytask :class:`EncoderDecoder`.

    from polytask.core.interop import from_hf
    model = from_hf(hf_model)                      # a transformers T5/BART model object
    model = from_hf("path/to/dir")                 # config.json + model.safetensors
    model = from_hf(state_dict, hf_config)         # tensors + config (dict or PretrainedConfig)

Every architectural difference is expressed through :class:`ModelConfig` (see
:mod:`polytask.core.interop.t5` and :mod:`polytask.core.interop.bart` for the option each feature maps to);
the model code has no T5 or BART special case. The result is numerically the Hugging Face
model (tests/core/test_interop.py checks logits, KV-cached decoding and greedy generation
against ``transformers``). Nothing is downloaded.

Loading is strict, like :func:`polytask.core.training.checkpoint.load_weights`: tensors the model needs but the
source lacks, tensors the source has but the model cannot use, and tensors of the wrong shape
are all listed in one ``ValueError``. The only tolerated differences are the ones
``transformers`` itself tolerates: stacks' copies of the tied embedding, a tied LM head, T5's
unused cross-attention position table, and a missing BART ``final_logits_bias`` (zeros).
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from polytask.core.training.checkpoint import check_state
from polytask.core.interop import bart, t5
from polytask.core.model.config import ModelConfig
from polytask.core.model.transformer import EncoderDecoder

FAMILIES: dict[str, ModuleType] = {"t5": t5, "bart": bart}


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors file(s) of a Hugging Face directory: ``model.safetensors``, else every
    shard its ``model.safetensors.index.json`` names (relative paths inside ``path`` only). A
    directory with only a pickled ``pytorch_model.bin`` is refused (it is never loaded:
    unpickling can run code)."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return [path / shard for shard in _shards(index)]
    if any((path / name).exists() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(
            f"{path} holds only pytorch_model.bin, a pickle, which polytask never loads (it can "
            "run code); convert it once where you trust the file: `from transformers import "
            "AutoModelForSeq2SeqLM; AutoModelForSeq2SeqLM.from_pretrained(DIR)"
            ".save_pretrained(DIR, safe_serialization=True)`")
    raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def _json_file(file: Path) -> Any:
    """The JSON value of ``file``; a damaged file is a ``ValueError`` naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{file}: not a JSON file ({err})") from None


def _shards(index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names in its ``weight_map``, each
    checked to be a relative path that stays in the index's directory: a downloaded index must
    not make polytask read files elsewhere (``../`` or an absolute path is refused)."""
    data = _json_file(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file); not a "
                         "safetensors index, or a damaged one")
    for shard in weight_map.values():
        parts = PurePosixPath(shard).parts if isinstance(shard, str) else ()
        if not parts or PurePosixPath(shard).is_absolute() or ".." in parts:
            raise ValueError(f"{index}: weight_map names shard {shard!r}, which is not a file "
                             f"inside {index.parent} (absolute and '..' paths are refused)")
    return sorted(set(weight_map.values()))


def _read_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``config.json`` and the tensors of :func:`weight_files`; a missing shard or a damaged
    file is a ``ValueError`` naming it."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json (expected a Hugging Face model directory)")
    config = _json_file(path / "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object, got "
                         f"{type(config).__name__}")
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise ValueError(f"{file}: missing (model.safetensors.index.json names it)")
        try:
            state.update(load_file(str(file)))
        except SafetensorError as err:  # truncated, or not safetensors at all
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
    return state, config


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ValueError(f"config must be a dict or a transformers PretrainedConfig, got {type(config)}")


def read_source(source: Any, config: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, HF config dict)`` of any accepted source (see :func:`from_hf`)."""
    if isinstance(source, (str, os.PathLike)):
        return _read_dir(Path(source))
    if isinstance(source, tuple) and len(source) == 2 and config is None:
        source, config = source
    if isinstance(source, torch.nn.Module):
        if not hasattr(source, "config"):
            raise ValueError(f"{type(source).__name__} has no .config; pass (state_dict, config)")
        return {k: v.detach() for k, v in source.state_dict().items()}, _config_dict(source.config)
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("a state dict source needs its Hugging Face config: "
                             "from_hf(state_dict, config)")
        return dict(source), _config_dict(config)
    raise ValueError(f"cannot read a model from {type(source).__name__}; pass a transformers model, "
                     "a directory path, or (state_dict, config)")


def _shared_embedding(state: dict[str, torch.Tensor], family: ModuleType) -> torch.Tensor | None:
    """The embedding matrix; every stack copy present must equal it (we keep one matrix)."""
    names = [n for n in (family.EMBEDDING, *family.TIED_COPIES) if n in state]
    if not names:
        return None
    embedding = state[names[0]]
    for name in names[1:]:
        if state[name].shape != embedding.shape or not torch.equal(state[name], embedding):
            raise ValueError(f"{name} differs from {names[0]}; polytask shares one token "
                             "embedding between the encoder and the decoder")
    state.setdefault(family.EMBEDDING, embedding)
    return embedding


def _check(mapped: dict[str, torch.Tensor], unknown: list[str], model: EncoderDecoder,
           family: str) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped tensors (polytask names)."""
    check_state(mapped, model, f"the {family} weights", side="source", names=" (polytask names)",
                extra_unexpected=unknown)


def from_hf(source: Any, config: Any = None) -> EncoderDecoder:
    """Build an :class:`EncoderDecoder` equal to a Hugging Face T5 or BART model.

    Args:
        source: a ``transformers`` ``T5ForConditionalGeneration`` / ``BartForConditionalGeneration``
            (or any model with ``.config`` and the same tensor names), a directory holding
            ``config.json`` and ``model.safetensors``, a ``(state_dict, config)`` pair, or a
            state dict with ``config`` given.
        config: the Hugging Face config (dict or ``PretrainedConfig``) of a state-dict source.

    Returns:
        the model in ``eval()`` mode, in the dtype of the source's embedding matrix.
    """
    state, hf = read_source(source, config)
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"unsupported model_type {kind!r}; choose one of {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    if family is bart:
        state = {bart.canonical(k): v for k, v in state.items()}
    embedding = _shared_embedding(state, family)
    head = state.get(family.LM_HEAD)
    tied = head is None or (embedding is not None and head.shape == embedding.shape
                            and torch.equal(head, embedding))
    where = (Path(source) / "config.json" if isinstance(source, (str, os.PathLike))
             else "the Hugging Face config")
    cfg, scale = _model_config(hf, tied, where)
    if family is t5:
        if scale and not tied:
            # v1.0-style output scaling with an untied head: fold d**-0.5 into the head, since
            # (h · d**-0.5) Wᵀ = h (W · d**-0.5)ᵀ, instead of adding a config option for it.
            state[family.LM_HEAD] = head * cfg.d_model ** -0.5
    else:
        bias = state.get(bart.LOGITS_BIAS)
        # transformers lists final_logits_bias as may-be-missing and then uses zeros; so do we.
        state[bart.LOGITS_BIAS] = (torch.zeros(cfg.vocab_size) if bias is None
                                   else bias.reshape(-1))
    skip = set(family.IGNORED) | set(family.TIED_COPIES) | ({family.LM_HEAD} if tied else set())
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, tensor in state.items():
        if name in skip:
            continue
        ours = family.rename(name)
        if ours is None:
            unknown.append(name)
        else:
            mapped[ours] = tensor
    cfg.check_memory()   # a checkpoint's config.json may claim any size
    model = EncoderDecoder(cfg)
    _check(mapped, unknown, model, kind)
    dtype = embedding.dtype if embedding is not None else torch.float32
    model.to(dtype)
    model.load_state_dict(mapped, strict=False)
    return model.eval()


def _model_config(hf: dict[str, Any], tied: bool, where: str | Path) -> tuple[ModelConfig, bool]:
    """``(ModelConfig, scale)`` of a T5 / BART config (``scale``: T5 v1.0's output scaling;
    False for BART); a missing key or a bad value is a ``ValueError`` naming ``where``."""
    try:
        if hf["model_type"] == "t5":
            return t5.model_config(hf, tied=tied)
        return bart.model_config(hf, tied=tied), False
    except KeyError as err:
        raise ValueError(f"{where}: missing key {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:  # a value of the wrong type or out of range
        raise ValueError(f"{where}: {err}") from None


def hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face T5/BART directory, checked to be one."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(f"{path} has no config.json (expected a Hugging Face model directory)")
    config = _json_file(file)
    if not isinstance(config, dict) or config.get("model_type") not in FAMILIES:
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"{file}: model_type {kind!r} is not supported; choose one of "
                         f"{', '.join(FAMILIES)}")
    return config


def hf_model_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face directory, from its ``config.json`` alone
    (``tie_word_embeddings`` says whether the head is tied; :func:`from_hf` checks it against
    the tensors when it loads them)."""
    hf = hf_config(path)
    tied = bool(hf.get("tie_word_embeddings", True))
    return _model_config(hf, tied, Path(path) / "config.json")[0]


__all__ = ["from_hf", "hf_config", "hf_model_config", "read_source", "weight_files", "FAMILIES"]

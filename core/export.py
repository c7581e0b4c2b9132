"""Export an :class:`EncoderDecoder` to ONNX and check the graphs with onnxruntime.

Three graphs per model, traced with ``torch.onnx.export`` (the TorchScript exporter,
``dynamo=False``: it needs no ``onnxscript``), every length and the batch size dynamic:

=====================  ==========================================  ===========================
file                   inputs                                      outputs
=====================  ==========================================  ===========================
encoder.onnx           src_ids (b, s) int64, src_mask (b, s) bool  memory (b, s, d)
decoder.onnx           tgt_ids (b, t), memory, src_mask            logits (b, t, V),
                                                                   present_{k,v}_{n} (b, hk, t, dh)
decoder_with_past.onnx tgt_ids (b, t'), memory, src_mask,          logits (b, t', V),
                       past_{k,v}_{n} (b, hk, L, dh)               present_{k,v}_{n} (b, hk, L + t', dh)
=====================  ==========================================  ===========================

Greedy decoding runs ``encoder`` once, ``decoder`` on the start token, then
``decoder_with_past`` one token at a time feeding each step's ``present_*`` back as ``past_*``
(the self-attention KV cache, one pair per decoder layer ``n``). Cross-attention keys and values
are recomputed from ``memory`` at every step (simpler graphs; costs ``O(s)`` per layer and
step). Every target position counts as real, as in :func:`polytask.core.decoding.generation.generate`.

Attention is traced with the ``reference`` backend (plain matmul / softmax ops every ONNX
runtime has); the model's own backend setting is restored afterwards. ``export.json`` records
the input/output names, the model config and the maximum absolute difference between
onnxruntime and PyTorch on inputs of other shapes than the traced ones (must be <= ``atol``).
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from polytask.attention.kv_cache import KVCache
from polytask.attention.multihead import MultiHeadAttention
from polytask.core.model.transformer import EncoderDecoder


class _ConcatKV(KVCache):
    """A KV cache that grows by ``torch.cat`` so the traced graph keeps the length dynamic
    (``KVCache`` preallocates with a Python-int capacity, which tracing would freeze)."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        super().__init__()
        self._k, self._v = k, v
        self.length = 0 if k is None else k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is not None:
            k, v = torch.cat([self._k, k], dim=2), torch.cat([self._v, v], dim=2)
        self._k, self._v, self.length = k, v, k.shape[2]
        return k, v


class EncoderGraph(nn.Module):
    """``(src_ids, src_mask)`` -> memory ``(b, s, d)``."""

    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(src_ids, src_mask)


class DecoderGraph(nn.Module):
    """``(tgt_ids, memory, src_mask, *past)`` -> ``(logits, *present)``; ``past`` is
    ``k_0, v_0, k_1, v_1, ...`` (empty when ``with_past`` is False)."""

    def __init__(self, model: EncoderDecoder, with_past: bool) -> None:
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = self.model.new_cache()
        for n, layer in enumerate(cache.layers):
            layer.self_attn = _ConcatKV(*past[2 * n: 2 * n + 2]) if self.with_past else _ConcatKV()
        if self.with_past:
            cache.key_mask = torch.ones_like(past[0][:, 0, :, 0], dtype=torch.bool)  # (b, L)
        hidden = self.model.decode(tgt_ids, memory, src_mask,
                                   torch.ones_like(tgt_ids, dtype=torch.bool), cache)
        present = [t for layer in cache.layers for t in (layer.self_attn.k, layer.self_attn.v)]
        return (self.model.logits(hidden), *present)


@contextlib.contextmanager
def _reference_attention(model: nn.Module) -> Iterator[None]:
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    saved = [m.backend for m in modules]
    for m in modules:
        m.backend = "reference"
    try:
        yield
    finally:
        for m, b in zip(modules, saved):
            m.backend = b


def _names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}_{n}" for n in range(n_layers) for kv in ("k", "v")]


def _example(model: EncoderDecoder, b: int, s: int, t: int, past: int, seed: int):
    """Random inputs ``(src_ids, src_mask, tgt_ids, past tensors)``; row 0 of the source padded."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    src = torch.randint(0, c.vocab_size, (b, s), generator=g)
    src_mask = torch.ones(b, s, dtype=torch.bool)
    src_mask[0, max(1, s - 2):] = False
    tgt = torch.randint(0, c.vocab_size, (b, t), generator=g)
    shape = (b, c.kv_heads, past, c.head_dim)
    dtype = model.embed_tokens.weight.dtype
    pasts = [torch.randn(shape, generator=g).to(dtype) for _ in range(2 * len(model.decoder.layers))]
    return src, src_mask, tgt, pasts


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], opset: int) -> None:
    # TracerWarnings flag the shape checks turned into constants; harmless here because
    # check_onnx runs every graph on other shapes than the traced ones. The TorchScript
    # exporter is deprecated in favour of dynamo=True, which needs the onnxscript package.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)


def export_model(model: EncoderDecoder, out_dir: str | Path, *, opset: int = 17,
                 check: bool = True, atol: float = 1e-4) -> list[Path]:
    """Write ``encoder.onnx``, ``decoder.onnx``, ``decoder_with_past.onnx`` and ``export.json``
    (see the module docstring) into ``out_dir`` and return their paths.

    With ``check`` (needs onnxruntime) each graph is run on inputs of different shapes than the
    traced ones and compared with PyTorch; a difference above ``atol`` raises ``ValueError``
    naming the graph and output.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = len(model.decoder.layers)
    past_in, present = _names(n_layers, "past"), _names(n_layers, "present")
    was_training = model.training
    model.eval()
    src, src_mask, tgt, pasts = _example(model, 2, 7, 3, 4, seed=0)
    enc_axes = {"src_ids": {0: "b", 1: "s"}, "src_mask": {0: "b", 1: "s"}, "memory": {0: "b", 1: "s"}}
    dec_axes = {"tgt_ids": {0: "b", 1: "t"}, "memory": {0: "b", 1: "s"},
                "src_mask": {0: "b", 1: "s"}, "logits": {0: "b", 1: "t"}}
    paths = [out / "encoder.onnx", out / "decoder.onnx", out / "decoder_with_past.onnx"]
    graphs = {"encoder.onnx": (["src_ids", "src_mask"], ["memory"]),
              "decoder.onnx": (["tgt_ids", "memory", "src_mask"], ["logits", *present]),
              "decoder_with_past.onnx": (["tgt_ids", "memory", "src_mask", *past_in],
                                         ["logits", *present])}
    try:
        with torch.no_grad(), _reference_attention(model):
            memory = model.encode(src, src_mask)
            _export(EncoderGraph(model), (src, src_mask), paths[0], *graphs["encoder.onnx"],
                    enc_axes, opset)
            _export(DecoderGraph(model, False), (tgt, memory, src_mask), paths[1],
                    *graphs["decoder.onnx"], {**dec_axes, **{p: {0: "b", 2: "t"} for p in present}},
                    opset)
            _export(DecoderGraph(model, True), (tgt, memory, src_mask, *pasts), paths[2],
                    *graphs["decoder_with_past.onnx"],
                    {**dec_axes, **{p: {0: "b", 2: "past"} for p in past_in},
                     **{p: {0: "b", 2: "total"} for p in present}}, opset)
            diffs = check_onnx(model, out, atol=atol) if check else {}
    finally:
        model.train(was_training)
    meta = {"graphs": {name: {"inputs": i, "outputs": o} for name, (i, o) in graphs.items()},
            "past_inputs": past_in, "present_outputs": present, "opset": opset,
            "max_abs_diff": diffs, "atol": atol, "config": model.config.to_dict()}
    (out / "export.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return [*paths, out / "export.json"]


def check_onnx(model: EncoderDecoder, out_dir: str | Path, *, atol: float = 1e-4
               ) -> dict[str, float]:
    """Run the three graphs in ``out_dir`` with onnxruntime on new shapes (batch 3, source 9,
    target 2, past 5) and return ``{graph: max |onnx - torch|}``; raise if any exceeds ``atol``."""
    import onnxruntime as ort

    out = Path(out_dir)
    src, src_mask, tgt, pasts = _example(model, 3, 9, 2, 5, seed=1)
    with torch.no_grad(), _reference_attention(model):
        memory = model.encode(src, src_mask)
        expected = {"encoder.onnx": (memory,),
                    "decoder.onnx": DecoderGraph(model, False)(tgt, memory, src_mask),
                    "decoder_with_past.onnx": DecoderGraph(model, True)(tgt, memory, src_mask, *pasts)}
    feeds: dict[str, dict[str, Any]] = {
        "encoder.onnx": {"src_ids": src, "src_mask": src_mask},
        "decoder.onnx": {"tgt_ids": tgt, "memory": memory, "src_mask": src_mask},
        "decoder_with_past.onnx": {"tgt_ids": tgt, "memory": memory, "src_mask": src_mask,
                                   **dict(zip(_names(len(pasts) // 2, "past"), pasts))},
    }
    diffs = {}
    for name, feed in feeds.items():
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        got = session.run(None, {k: v.numpy() for k, v in feed.items() if k in wanted})
        if len(got) != len(expected[name]):
            raise ValueError(f"{name}: onnxruntime returned {len(got)} outputs, expected "
                             f"{len(expected[name])}")
        diffs[name] = max(float((torch.from_numpy(g) - e).abs().max()) if e.numel() else 0.0
                          for g, e in zip(got, expected[name]))
        if diffs[name] > atol:
            raise ValueError(f"{name}: onnxruntime differs from PyTorch by {diffs[name]:.3g} > "
                             f"atol {atol}")
    return diffs


def onnx_greedy(out_dir: str | Path, src_ids: torch.Tensor, src_mask: torch.Tensor, *,
                bos_id: int, eos_id: int, pad_id: int, max_new_tokens: int = 32) -> torch.Tensor:
    """Greedy decoding with the exported graphs only (onnxruntime), as the module docstring
    describes; returns ``(b, t)`` tokens in the format of :func:`polytask.core.decoding.generation.generate`."""
    import numpy as np
    import onnxruntime as ort

    out = Path(out_dir)
    run = {n: ort.InferenceSession(str(out / f"{n}.onnx"), providers=["CPUExecutionProvider"])
           for n in ("encoder", "decoder", "decoder_with_past")}
    past_names = json.loads((out / "export.json").read_text())["past_inputs"]
    src, mask = src_ids.numpy(), src_mask.numpy()
    (memory,) = run["encoder"].run(None, {"src_ids": src, "src_mask": mask})
    token = np.full((src.shape[0], 1), bos_id, dtype=np.int64)
    finished = np.zeros(src.shape[0], dtype=bool)
    generated, past = [], None
    for _ in range(max_new_tokens):
        feed = {"tgt_ids": token, "memory": memory, "src_mask": mask}
        if past is None:
            logits, *past = run["decoder"].run(None, feed)
        else:
            logits, *past = run["decoder_with_past"].run(None, {**feed, **dict(zip(past_names, past))})
        nxt = np.where(finished, pad_id, logits[:, -1].argmax(-1))
        generated.append(nxt)
        finished |= nxt == eos_id
        token = nxt[:, None].astype(np.int64)
        if finished.all():
            break
    return torch.from_numpy(np.stack(generated, axis=1))

"""ONNX export (:mod:`polytask.core.export`): onnxruntime agrees with PyTorch on new shapes, greedy decoding
with the exported graphs (KV cache as past/present tensors) gives the tokens of
:func:`polytask.core.decoding.generation.generate`, and a polytask run directory exports per task."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs the onnx package (extra [onnx])")
pytest.importorskip("onnxruntime", reason="the export check runs the graphs with onnxruntime (extra [onnx])")

from polytask.core.model.config import ModelConfig  # noqa: E402
from polytask.core.export import check_onnx, export_model, onnx_greedy  # noqa: E402
from polytask.core.decoding.generation import generate  # noqa: E402
from polytask.core.model.transformer import EncoderDecoder  # noqa: E402

SMALL = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_encoder_layers=2,
             n_decoder_layers=2, dropout=0.0, init_std=0.3)
VARIANTS = {
    # T5-like: relative bias, RMS norm, gated GELU, no biases, unscaled scores, d_head != d/h
    "t5": dict(positions="relative", relative_buckets=8, relative_max_distance=20, norm="rmsnorm",
               activation="geglu_tanh", bias=False, scale_attention=False, d_head=6,
               rescale_tied_output=True),
    # BART-like with grouped-query heads: learned offset positions, post-norm, logits bias
    "bart": dict(positions="learned", position_offset=2, max_length=40, norm_position="post",
                 embedding_norm=True, lm_head_bias=True, scale_embeddings=True, n_kv_heads=2),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig(**SMALL, **VARIANTS[request.param])).eval()
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    return model, out, export_model(model, out)


def test_graphs_match_pytorch(exported):
    model, out, paths = exported
    assert [p.name for p in paths] == ["encoder.onnx", "decoder.onnx", "decoder_with_past.onnx",
                                       "export.json"]
    meta = json.loads((out / "export.json").read_text())
    assert set(meta["max_abs_diff"]) == {"encoder.onnx", "decoder.onnx", "decoder_with_past.onnx"}
    assert max(meta["max_abs_diff"].values()) <= 1e-4
    assert meta["past_inputs"] == ["past_k_0", "past_v_0", "past_k_1", "past_v_1"]


def test_onnx_greedy_equals_generate(exported):
    model, out, _ = exported
    g = torch.Generator().manual_seed(4)
    src = torch.randint(4, 40, (3, 11), generator=g)
    src_mask = torch.arange(11)[None, :] < torch.tensor([11, 6, 3])[:, None]
    c = model.config
    ours = generate(model, src, src_mask, max_new_tokens=10, bos_id=c.bos_id, eos_id=c.eos_id,
                    pad_id=c.pad_id)
    eos = int(ours[0, 3])  # a token row 0 emits early, so rows stop at different steps
    ours = generate(model, src, src_mask, max_new_tokens=10, bos_id=c.bos_id, eos_id=eos,
                    pad_id=c.pad_id)
    theirs = onnx_greedy(out, src, src_mask, bos_id=c.bos_id, eos_id=eos, pad_id=c.pad_id,
                         max_new_tokens=10)
    assert ours.shape[1] > 4 and torch.equal(ours, theirs)


def test_check_detects_a_mismatch(exported):
    model, out, _ = exported
    torch.manual_seed(1)  # the fixture's model was drawn after seed 0
    changed = EncoderDecoder(model.config).eval()  # same architecture, other weights
    with pytest.raises(ValueError, match=r"encoder\.onnx: onnxruntime differs from PyTorch"):
        check_onnx(changed, out)


def test_export_run_directory(tmp_path):
    from polytask.core.training.checkpoint import save_weights
    from polytask.core.training.manifest import write_json
    from polytask.experiments.build import build_run as setup
    from polytask.experiments.config import load_config
    from polytask.experiments.runs import resolve_tasks
    from polytask.experiments.runs import export_run

    cfg = load_config("experiments/configs/tiny.yaml",
                      ["model.d_model=16", "model.d_ff=32", "model.n_heads=2",
                       "model.n_encoder_layers=1", "model.n_decoder_layers=1"])
    run = tmp_path / "run"
    run.mkdir()
    specs = resolve_tasks(cfg)
    _, _, model = setup(cfg, specs, run, fresh_tokenizer=True)
    write_json(run / "config.json", cfg.to_dict())
    save_weights(run / "model.safetensors", model)
    first = specs[0].name
    paths = export_run(run, tmp_path / "onnx", tasks=[first])
    assert [p.relative_to(tmp_path / "onnx").as_posix() for p in paths] == [
        f"{first}/encoder.onnx", f"{first}/decoder.onnx", f"{first}/decoder_with_past.onnx",
        f"{first}/export.json"]
    with pytest.raises(ValueError, match="unknown task 'nope'; tasks: "):
        export_run(run, tmp_path / "onnx", tasks=["nope"])

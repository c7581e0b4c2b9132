"""Smoke test of the training / decoding benchmarks at toy sizes: the code paths run and the
outputs are well-formed and sane. No timing is asserted (speed is measured, never tested)."""
import json

import pytest

from polytask.core.model.config import ModelConfig
from polytask.experiments.bench import decode, train
from polytask.experiments.bench.flops import attention_flops, linear_flops, step_flops
from polytask.experiments.bench.peers import SIZES, build_all


def test_flop_count_equals_hand_formula():
    # d 8, h 2 (head 4), d_ff 16, 1 + 1 layers, V 10; b 2, s 3, t 5
    config = ModelConfig(vocab_size=10, d_model=8, n_heads=2, d_ff=16, n_encoder_layers=1,
                         n_decoder_layers=1)
    enc = (4 * 8 * 8 + 2 * 8 * 16) * (2 * 3)        # q k v out + wi wo, on b·s tokens
    dec = (6 * 8 * 8 + 2 * 8 * 16) * (2 * 5)        # self q k v out, cross q out, ffn, on b·t
    cross_kv = 2 * 8 * 8 * (2 * 3)                  # cross k v on the memory tokens
    lm_head = 10 * 8 * (2 * 5)
    assert linear_flops(config, 2, 3, 5) == 6 * (enc + dec + cross_kv + lm_head) == 66240
    # (qkᵀ + pv) = 2 matmuls × 2 FLOPs × b·h·i·j·d_head, × 3 for fwd + bwd
    pairs = 3 * 3 + 5 * 5 + 5 * 3
    assert attention_flops(config, 2, 3, 5) == 3 * 2 * 2 * 2 * 2 * 4 * pairs == 9408
    assert step_flops(config, 2, 3, 5)["total"] == 66240 + 9408


def test_peers_produce_logits_of_the_same_shape():
    size = SIZES["toy"]
    contenders, missing = build_all(size, ["polytask", "hf_t5", "torch", "x_transformers"])
    assert {c.name for c in contenders} | set(missing) == {"polytask", "hf_t5", "torch",
                                                            "x_transformers"}
    import torch
    src = torch.randint(4, size.vocab, (size.batch, size.length))
    for c in contenders:
        assert c.logits(src, src[:, :5]).shape == (size.batch, 5, size.vocab), c.name


def test_train_benchmark_outputs(tmp_path, capsys):
    path = tmp_path / "train.json"
    result = train.main(["--size", "toy", "--models", "polytask", "torch", "--warmup", "1",
                         "--rounds", "1", "--steps", "1", "--json", str(path)])
    assert "polytask / fastest peer" in capsys.readouterr().out
    assert json.loads(path.read_text())["rows"][0]["model"] == "polytask"
    assert [r["model"] for r in result["rows"]] == ["polytask", "torch"]
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["params"] > 0
        assert r["peak_bytes"] > 4 * r["params"]  # at least the fp32 weights themselves
    assert result["speed_ratio"] > 0 and result["fastest_peer"] == "torch"
    assert 0 < result["fraction_of_peak"] and result["peak_flops"] > 0
    if result["onednn_peak_flops"] is not None:          # PyTorch built with oneDNN
        assert len(result["onednn_peak_flops_per_round"]) == 1
        assert result["fraction_of_onednn_peak"] == pytest.approx(
            result["achieved_flops"] / result["onednn_peak_flops"])
    assert result["tokens_per_step"] == 2 * SIZES["toy"].batch * SIZES["toy"].length
    assert result["memory_ratio_vs_hf_t5"] is None  # hf_t5 was not run


def test_missing_peer_is_reported_not_fatal(monkeypatch):
    def broken(size):
        raise ImportError("no such library")

    monkeypatch.setitem(train.BUILDERS, "x_transformers", broken)
    built, missing = build_all(SIZES["toy"], ["polytask", "x_transformers"])
    assert [c.name for c in built] == ["polytask"]
    assert "no such library" in missing["x_transformers"]


def test_decode_benchmark_outputs(capsys):
    result = decode.main(["--size", "toy", "--lengths", "2", "4", "--repeats", "2"])
    assert "polytask / hf_t5" in capsys.readouterr().out
    rows = {(r["model"], r["length"]): r for r in result["rows"]}
    batch = SIZES["toy"].batch
    for name in ("polytask", "hf_t5"):
        for n in (2, 4):
            assert rows[(name, n)]["tokens"] == batch * n  # nobody stopped early
            assert rows[(name, n)]["tokens_per_s"] > 0
    assert rows[("polytask (no cache)", 2)]["tokens"] == batch * 2
    assert set(result["speedup_vs_hf"]) == {2, 4}
    assert all(v > 0 for v in result["speedup_vs_hf"].values())
    # one ratio per round; with two rounds the ratio of the medians (means) lies between them
    assert set(result["speedup_per_round"]) == {2, 4}
    for n, rounds in result["speedup_per_round"].items():
        assert len(rounds) == 2
        assert min(rounds) - 1e-9 <= result["speedup_vs_hf"][n] <= max(rounds) + 1e-9
    assert result["per_token_growth"] is not None


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="unknown model"):
        build_all(SIZES["toy"], ["nope"])

"""PEFT: identity at init, frozen weights untouched by AdamW with weight decay, LoRA merge,
BitFit's bias-only training, prompt tuning with generation, and the errors."""

import pytest
import torch
import torch.nn.functional as F

from polytask.core.model.config import ModelConfig
from polytask.core.decoding.generation import generate
from polytask.core.peft import (AdaptedLinear, LoRALinear, PromptTuning, apply_peft, merge_lora,
                       trainable_parameter_names, unmerge_lora, unwrap_lora)
from polytask.core.model.transformer import EncoderDecoder

CONFIG = ModelConfig(vocab_size=20, d_model=16, n_heads=2, n_encoder_layers=2,
                     n_decoder_layers=2, d_ff=32, dropout=0.0, max_length=32)
N_ATTENTION = 2 + 2 * 2  # encoder self-attention + decoder self- and cross-attention
N_FFN = 2 + 2


def tiny_model() -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(CONFIG)


def batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 20, (3, 6), generator=g)
    src[0, 4:] = CONFIG.pad_id
    tgt = torch.randint(4, 20, (3, 5), generator=g)
    tgt[:, 0] = CONFIG.bos_id
    labels = torch.randint(4, 20, (3, 5), generator=g)
    return src, tgt, labels


def adapted(method: str, **options):
    model = tiny_model()
    if method == "prompt":
        model = PromptTuning(model, n_tokens=3)
    return model, apply_peft(model, method, **options)


def train_steps(model, steps: int = 3) -> None:
    """A few AdamW steps on *all* parameters, with weight decay, as a careless user would."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    src, tgt, labels = batch()
    for _ in range(steps):
        logits = model(src, tgt)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lora_and_adapters_start_as_the_base_model(method):
    base = tiny_model().eval()
    model, _ = adapted(method)
    src, tgt, _ = batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(src, tgt), base(src, tgt))


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit", "prompt"])
def test_frozen_parameters_stay_bit_identical_under_adamw_weight_decay(method):
    model, trainable = adapted(method)
    assert trainable == trainable_parameter_names(model) and trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    changed = []
    for name, p in model.named_parameters():
        if name in trainable:
            changed.append(not torch.equal(p, before[name]))
        else:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert any(changed), "training changed no trainable parameter"


def test_lora_wraps_only_the_targets_and_adds_r_times_in_plus_out():
    model, trainable = adapted("lora", targets=["q_proj", "v_proj"], r=4, alpha=8)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * N_ATTENTION
    assert all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == 2 * N_ATTENTION * 4 * (16 + 16)


def test_lora_patterns_accept_wildcards_on_full_names():
    model, _ = adapted("lora", targets=["decoder.layers.*.self_attn.q_proj"])
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["decoder.layers.0.self_attn.q_proj", "decoder.layers.1.self_attn.q_proj"]


def test_merged_lora_gives_the_unmerged_output():
    model, _ = adapted("lora", targets=["q_proj", "v_proj", "wo"], r=2, alpha=4)
    train_steps(model)  # B != 0 now
    model.eval()
    src, tgt, _ = batch()
    weights = {n: m.base.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, LoRALinear)}
    with torch.no_grad():
        unmerged = model(src, tgt)
        merge_lora(model)
        merged = model(src, tgt)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged, tiny_model().eval()(src, tgt), atol=1e-3)
        unmerge_lora(model)
        torch.testing.assert_close(model(src, tgt), unmerged, atol=1e-5, rtol=1e-5)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            torch.testing.assert_close(module.base.weight, weights[name], atol=1e-6, rtol=0)


def test_unwrapped_lora_is_a_plain_model_with_the_merged_output():
    model, _ = adapted("lora", r=2)
    train_steps(model)
    model.eval()
    src, tgt, _ = batch()
    with torch.no_grad():
        expected = model(src, tgt)
        assert len(unwrap_lora(model)) == 2 * N_ATTENTION
        torch.testing.assert_close(model(src, tgt), expected, atol=1e-5, rtol=1e-5)
    assert model.state_dict().keys() == tiny_model().state_dict().keys()


def test_merge_equals_the_closed_form():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(5, 3), r=2, alpha=6.0)
    torch.nn.init.normal_(layer.lora_B)
    w = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight, w + 3.0 * layer.lora_B @ layer.lora_A)


def test_adapters_follow_every_attention_output_and_feedforward_output():
    model, trainable = adapted("adapter", bottleneck=4)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert sum(n.endswith("out_proj") for n in wrapped) == N_ATTENTION
    assert sum(n.endswith("ffn.wo") for n in wrapped) == N_FFN
    assert len(wrapped) == N_ATTENTION + N_FFN
    assert all(".adapter." in n for n in trainable)


def test_bitfit_trains_exactly_the_biases():
    model, trainable = adapted("bitfit")
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert sorted(trainable) == sorted(biases)
    assert any("q_proj" in n for n in trainable) and any("norm" in n for n in trainable)


def test_prompt_tuning_prepends_and_composes_with_generation():
    model, trainable = adapted("prompt")
    assert trainable == ["prompt"]
    src, tgt, _ = batch()
    model.eval()
    memory = model.encode(src)
    assert memory.shape == (3, 3 + src.shape[1], CONFIG.d_model)
    # The original (b, s) mask works for decode, and a padded source row stays padded.
    src_mask = src != CONFIG.pad_id
    with torch.no_grad():
        full = model.logits(model.decode(tgt, memory, src_mask))
        torch.testing.assert_close(full, model(src, tgt))
    fast = generate(model, src, max_new_tokens=6)
    slow = generate(model, src, max_new_tokens=6, use_cache=False)
    assert torch.equal(fast, slow)
    # The prompt is live: changing it changes the output.
    with torch.no_grad():
        model.prompt.add_(torch.randn_like(model.prompt))  # (a constant would be normed away)
        assert not torch.allclose(model(src, tgt), full)


def test_full_fine_tuning_trains_everything():
    model, trainable = adapted("full")
    assert trainable == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("call, match", [
    (lambda m: apply_peft(m, "ia3"), "ia3.*lora, adapter, prompt, bitfit, full"),
    (lambda m: apply_peft(m, "lora", rank=4), "rank.*targets, r, alpha, dropout"),
    (lambda m: apply_peft(m, "lora", targets=["qkv"]), "qkv.*q_proj"),
    (lambda m: apply_peft(m, "lora", r=0), "r \\(0\\)"),
    (lambda m: apply_peft(m, "prompt"), "PromptTuning"),
    (lambda m: apply_peft(m, "adapter", activation="tanh"), "tanh.*relu, gelu"),
])
def test_bad_methods_and_options_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model())


def test_bitfit_without_biases_raises():
    model = EncoderDecoder(ModelConfig(vocab_size=20, d_model=16, n_heads=2, d_ff=32,
                                       n_encoder_layers=1, n_decoder_layers=1, bias=False,
                                       norm="rmsnorm"))
    with pytest.raises(ValueError, match="no bias"):
        apply_peft(model, "bitfit")

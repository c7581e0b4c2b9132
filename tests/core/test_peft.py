"""PEFT on one EncoderDecoder: identity at init, frozen weights untouched by AdamW with weight
decay, LoRA merge, BitFit's bias-only training, prompt tuning (against the paper's definition,
and with generation), option validation, parameter counts. Multi-task models and runs:
tests/experiments/test_peft_runs.py."""
import math
from typing import get_args, get_type_hints

import pytest
import torch
import torch.nn.functional as F

from polytask.core.decoding.generation import generate
from polytask.core.model.config import ModelConfig
from polytask.core.model.transformer import EncoderDecoder, count_parameters
from polytask.core.peft import (PEFT_METHODS, AdaptedLinear, LoRALinear, PromptEmbedding,
                                apply_peft, describe_counts, merge_lora, parameter_counts,
                                trainable_parameter_names, unmerge_lora, unwrap_lora)
from polytask.core.peft.adapters import ACTIVATIONS
from polytask.core.peft.options import OPTIONS, AdapterOptions
from polytask.core.peft.prompt import extend_mask

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
        options = {"n_tokens": 3, **options}
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


def test_a_module_held_in_two_places_is_wrapped_in_both():
    """LoRA installs its wrapper wherever the target is held (as a multi-task model's task
    views hold its slot modules)."""
    model = tiny_model()
    shared = model.decoder.layers[0].self_attn.q_proj
    model.decoder.layers[1].self_attn.q_proj = shared
    apply_peft(model, "lora", targets=["decoder.layers.0.self_attn.q_proj"], r=2)
    first, second = (model.decoder.layers[i].self_attn.q_proj for i in (0, 1))
    assert isinstance(first, LoRALinear) and second is first
    unwrap_lora(model)
    assert model.decoder.layers[1].self_attn.q_proj is shared
    assert model.decoder.layers[0].self_attn.q_proj is shared


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


def test_prompt_embedding_looks_up_virtual_ids_in_the_prompt_rows():
    base = torch.nn.Embedding(10, 4)
    emb = PromptEmbedding(base, 3, init_from_vocab=False)
    ids = torch.tensor([[0, 9, 10, 12], [11, 3, 10, 1]])
    out = emb(ids)
    real = ids < 10
    assert torch.equal(out[real], base(ids[real]))
    assert torch.equal(out[~real], emb.prompt[ids[~real] - 10])
    out.sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad
    assert torch.equal(emb.prompt.grad, torch.tensor([2.0, 1.0, 1.0])[:, None].expand(3, 4))
    assert emb.weight is base.weight and emb.num_embeddings == 10


def test_prompt_initialised_from_the_vocabulary_skips_special_tokens():
    torch.manual_seed(0)
    base = torch.nn.Embedding(6, 4)
    emb = PromptEmbedding(base, 50, init_from_vocab=True, special_ids=(0, 1, 2))
    vocab = [tuple(row) for row in base.weight.tolist()]
    picked = {vocab.index(tuple(row)) for row in emb.prompt.tolist()}  # raises if not a row
    assert picked == {3, 4, 5}  # every token but pad, bos and eos, nothing else


def test_prompt_tuning_is_the_encoder_run_on_prompt_then_source():
    """Lester et al. section 2: the encoder runs on ``[P; embed(x)]`` and the decoder attends
    to all of it. The oracle runs the untouched base model's stacks on that concatenation."""
    base = tiny_model().eval()
    model, _ = adapted("prompt")
    model.eval()
    scale = math.sqrt(CONFIG.d_model) if CONFIG.scale_embeddings else 1.0  # as every token
    prompt = model.embed_tokens.prompt.detach() * scale  # (3, d)
    src, tgt, _ = batch()
    mask = src != CONFIG.pad_id
    with torch.no_grad():
        x = torch.cat([prompt.expand(3, -1, -1), base.embed(src)], dim=1)
        memory = base.encoder(x, extend_mask(mask, 3))
        expected = base.logits(base.decode(tgt, memory, extend_mask(mask, 3)))
        torch.testing.assert_close(model(src, tgt), expected, atol=1e-6, rtol=1e-6)
        assert memory.shape == model.encode(src).shape == (3, 3 + src.shape[1], CONFIG.d_model)


def test_prompt_tuning_composes_with_generation():
    model, trainable = adapted("prompt")
    assert trainable == ["embed_tokens.prompt"]
    src, tgt, _ = batch()
    model.eval()
    memory = model.encode(src)
    # The source's own (b, s) mask works for decode, and a padded source row stays padded.
    src_mask = src != CONFIG.pad_id
    with torch.no_grad():
        full = model.logits(model.decode(tgt, memory, src_mask))
        torch.testing.assert_close(full, model(src, tgt))
    fast = generate(model, src, max_new_tokens=6)
    slow = generate(model, src, max_new_tokens=6, use_cache=False, accelerate=False)
    beam = generate(model, src, max_new_tokens=6, method="beam", num_beams=1)
    assert torch.equal(fast, slow) and torch.equal(fast, beam)
    # The prompt is live: changing it changes the output.
    with torch.no_grad():
        model.embed_tokens.prompt.add_(torch.randn_like(model.embed_tokens.prompt))
        assert not torch.allclose(model(src, tgt), full)


def test_full_fine_tuning_trains_everything():
    model, trainable = adapted("full")
    assert trainable == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("call, match", [
    (lambda m: apply_peft(m, "ia3"), "'ia3'.*choices: lora, adapter, prompt, bitfit, full"),
    (lambda m: apply_peft(m, "lora", rank=4), "peft.rank.*options: targets, r, alpha, dropout"),
    (lambda m: apply_peft(m, "prompt", n_token=4),
     "n_token.*options: n_tokens, init_from_vocab, per_task"),
    (lambda m: apply_peft(m, "bitfit", r=4), "peft.r for PEFT method 'bitfit'; options: none"),
    (lambda m: apply_peft(m, "lora", targets=["qkv"]), "qkv.*q_proj"),
    (lambda m: apply_peft(m, "lora", targets=[]), "peft.targets = \\[\\] is invalid"),
    (lambda m: apply_peft(m, "lora", r=0), "peft.r = 0 is invalid"),
    (lambda m: apply_peft(m, "lora", r="8"), "peft.r = '8' is invalid: expected int"),
    (lambda m: apply_peft(m, "lora", dropout=1.0), "peft.dropout = 1.0 is invalid"),
    (lambda m: apply_peft(m, "prompt", n_tokens=0), "peft.n_tokens = 0 is invalid"),
    (lambda m: apply_peft(m, "prompt", per_task="yes"), "peft.per_task = 'yes' is invalid"),
    (lambda m: apply_peft(m, "adapter", activation="tanh"), "'tanh' is invalid.*'relu', 'gelu'"),
])
def test_bad_methods_and_options_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model())


def test_every_method_has_its_options_and_the_activations_agree():
    assert PEFT_METHODS.keys() == OPTIONS.keys()
    activation = get_type_hints(AdapterOptions)["activation"]
    assert set(get_args(activation)) == set(ACTIVATIONS)


def test_prompt_tuning_twice_raises():
    model, _ = adapted("prompt")
    with pytest.raises(ValueError, match="prompt-tuned already"):
        apply_peft(model, "prompt")


def test_bitfit_without_biases_raises():
    model = EncoderDecoder(ModelConfig(vocab_size=20, d_model=16, n_heads=2, d_ff=32,
                                       n_encoder_layers=1, n_decoder_layers=1, bias=False,
                                       norm="rmsnorm"))
    with pytest.raises(ValueError, match="no bias"):
        apply_peft(model, "bitfit")


def test_parameter_counts_equal_the_closed_forms():
    model = tiny_model()
    assert parameter_counts(model) == {"trainable": count_parameters(CONFIG),
                                       "total": count_parameters(CONFIG)}
    apply_peft(model, "lora", r=4)
    lora = 2 * N_ATTENTION * 4 * (16 + 16)
    assert parameter_counts(model) == {"trainable": lora, "total": count_parameters(CONFIG) + lora}
    assert describe_counts({"trainable": 12345, "total": 1234567}) == \
        "trainable 12,345 of 1,234,567 parameters (1.0%)"
    assert describe_counts({"trainable": 3, "total": 100000}) == \
        "trainable 3 of 100,000 parameters (0.003%)"

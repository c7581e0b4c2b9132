"""Generation: cached == uncached decoding, greedy == 1-beam, beam search == exhaustive search
with enough beams, sampling filters, eos handling, determinism."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.core.decoding.beam import beam_search, gnmt_length_penalty
from polytask.core.model.config import ModelConfig
from polytask.core.decoding.generation import generate, sequence_log_probs, top_k_filter, top_p_filter
from polytask.core.model.transformer import EncoderDecoder

PAD, BOS, EOS = 0, 2, 3


def tiny_model(vocab_size: int = 10, seed: int = 0) -> EncoderDecoder:
    """A random EncoderDecoder with peaked next-token distributions (init_std 0.5) that, like
    a trained model, never emits pad or bos (their output bias is -1e4), so any pad in an
    output is padding."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, d_model=16, n_heads=2, n_encoder_layers=1,
                         n_decoder_layers=2, d_ff=32, dropout=0.0, init_std=0.5,
                         tie_embeddings=False, lm_head_bias=True, max_length=64,
                         positions="sinusoidal")  # the fixture's seeds were chosen with these
    model = EncoderDecoder(config).eval()
    with torch.no_grad():
        model.lm_head.bias[[PAD, BOS]] = -1e4
    return model


def sources(batch: int = 6, length: int = 7, vocab_size: int = 10) -> torch.Tensor:
    src = torch.randint(4, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    src[1, 4:] = PAD  # a padded row
    src[3, 2:] = PAD
    return src


IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)


class Spy:
    """Duck-typed wrapper that records how the model is called."""

    def __init__(self, model):
        self.model, self.encode_calls, self.decode_lengths = model, 0, []

    def encode(self, src_ids, src_mask=None):
        self.encode_calls += 1
        return self.model.encode(src_ids, src_mask)

    def decode(self, tgt_ids, memory, src_mask=None, tgt_mask=None, cache=None):
        self.decode_lengths.append(tgt_ids.shape[1])
        return self.model.decode(tgt_ids, memory, src_mask, tgt_mask, cache)

    def logits(self, hidden):
        return self.model.logits(hidden)

    def new_cache(self):
        return self.model.new_cache()


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cached_and_uncached_decoding_give_the_same_tokens(method):
    model, src = tiny_model(), sources()
    fast = generate(model, src, max_new_tokens=10, method=method, num_beams=3, **IDS)
    slow = generate(model, src, max_new_tokens=10, method=method, num_beams=3,
                    use_cache=False, **IDS)
    assert torch.equal(fast, slow)
    assert (fast == EOS).any(), "fixture should produce some eos"


def test_cached_and_uncached_sampling_agree_for_one_seed():
    model, src = tiny_model(), sources()
    run = lambda cache: generate(model, src, max_new_tokens=10, method="sample", top_p=0.9,
                                 use_cache=cache, generator=torch.Generator().manual_seed(3),
                                 **IDS)
    assert torch.equal(run(True), run(False))


def test_cached_and_uncached_beam_scores_agree():
    model, src = tiny_model(), sources()
    _, fast = beam_search(model, src, num_beams=3, max_new_tokens=8, **IDS)
    _, slow = beam_search(model, src, num_beams=3, max_new_tokens=8, use_cache=False, **IDS)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_cache_encodes_once_and_feeds_one_token_per_step():
    spy = Spy(tiny_model())
    out = generate(spy, sources(), max_new_tokens=6, **IDS)
    assert spy.encode_calls == 1
    assert spy.decode_lengths == [1] * out.shape[1]
    spy = Spy(tiny_model())
    out = generate(spy, sources(), max_new_tokens=6, use_cache=False, **IDS)
    assert spy.decode_lengths == list(range(1, out.shape[1] + 1))  # the slow twin
    spy = Spy(tiny_model())
    generate(spy, sources(), max_new_tokens=6, method="beam", num_beams=3, **IDS)
    assert spy.encode_calls == 1 and set(spy.decode_lengths) == {1}


def test_greedy_equals_beam_search_with_one_beam():
    # With length_penalty 0 a 1-beam search can never prefer a later, longer hypothesis.
    model, src = tiny_model(), sources()
    greedy = generate(model, src, max_new_tokens=10, **IDS)
    beam = generate(model, src, max_new_tokens=10, method="beam", num_beams=1,
                    length_penalty=0.0, **IDS)
    assert torch.equal(greedy, beam)


def _all_hypotheses(vocab_size: int, max_len: int) -> list[list[int]]:
    """Every possible output: n - 1 non-eos tokens then eos (n <= max_len), or max_len
    non-eos tokens."""
    other = [v for v in range(vocab_size) if v != EOS]
    hyps = []
    for n in range(1, max_len + 1):
        hyps += [list(p) + [EOS] for p in itertools.product(other, repeat=n - 1)]
    hyps += [list(p) for p in itertools.product(other, repeat=max_len)]
    return hyps


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_with_enough_beams_is_exhaustive_search(alpha):
    vocab, max_len = 6, 3
    model = tiny_model(vocab_size=vocab, seed=3)
    src = sources(batch=4, vocab_size=vocab)
    # (V - 1) ** (max_len - 1) beams keep every prefix alive until the last step.
    tokens, scores = beam_search(model, src, num_beams=(vocab - 1) ** (max_len - 1),
                                 max_new_tokens=max_len, length_penalty=alpha, **IDS)
    hyps = _all_hypotheses(vocab, max_len)
    grid = torch.tensor([h + [PAD] * (max_len - len(h)) for h in hyps])
    for i in range(src.shape[0]):
        log_p, length = sequence_log_probs(model, src[i:i + 1].expand(len(hyps), -1), grid, **IDS)
        exhaustive = log_p / gnmt_length_penalty(length.double(), alpha)
        best = int(exhaustive.argmax())
        assert scores[i].item() == pytest.approx(exhaustive[best].item(), abs=1e-4)
        assert tokens[i].tolist() == grid[best, :tokens.shape[1]].tolist()


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_score_is_at_least_greedy_score(alpha):
    model, src = tiny_model(seed=1), sources()
    greedy = generate(model, src, max_new_tokens=10, **IDS)
    log_p, length = sequence_log_probs(model, src, greedy, **IDS)
    greedy_score = log_p / gnmt_length_penalty(length.float(), alpha)
    beam_tokens, beam_score = beam_search(model, src, num_beams=4, max_new_tokens=10,
                                          length_penalty=alpha, **IDS)
    assert (beam_score >= greedy_score - 1e-5).all()
    # The reported score is the teacher-forced score of the returned tokens.
    log_p, length = sequence_log_probs(model, src, beam_tokens, **IDS)
    torch.testing.assert_close(beam_score, log_p / gnmt_length_penalty(length.float(), alpha),
                               atol=1e-4, rtol=0)


def test_top_k_1_sampling_equals_greedy():
    model, src = tiny_model(), sources()
    greedy = generate(model, src, max_new_tokens=10, **IDS)
    sampled = generate(model, src, max_new_tokens=10, method="sample", top_k=1,
                       temperature=0.7, generator=torch.Generator().manual_seed(5), **IDS)
    assert torch.equal(greedy, sampled)


def test_top_p_filter_hand_worked():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()
    assert kept(0.5) == [0]           # 0.5 >= 0.5 already
    assert kept(0.51) == [0, 1]
    assert kept(0.8) == [0, 1]        # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-6) == [0]          # the most likely token always survives


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12), st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(values, p):
    logits = torch.tensor([values], dtype=torch.float64)
    probs = logits.softmax(-1)[0]
    keep = torch.isfinite(top_p_filter(logits, p))[0]
    assert probs[keep].sum() >= p - 1e-12
    # every kept token is at least as likely as every dropped one ...
    if (~keep).any():
        assert probs[keep].min() >= probs[~keep].max()
    # ... and without the least likely kept token the mass falls below p (smallest set).
    assert probs[keep].sum() - probs[keep].min() < p


def test_top_k_filter_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 1.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_sampling_only_draws_from_the_top_k():
    model, src = tiny_model(), sources()
    out = generate(model, src, max_new_tokens=1, method="sample", top_k=2,
                   generator=torch.Generator().manual_seed(0), **IDS)
    with torch.no_grad():
        logits = model(src, torch.full((src.shape[0], 1), BOS))[:, 0]
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == out[:, :1]).any(dim=1).all()


def test_seeded_sampling_is_deterministic():
    model, src = tiny_model(), sources()
    run = lambda seed: generate(model, src, max_new_tokens=10, method="sample", top_p=0.9,
                                temperature=1.3, generator=torch.Generator().manual_seed(seed),
                                **IDS)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


class Scripted:
    """Duck-typed model whose row r emits token 5 for ``src[r, 0]`` steps, then eos."""

    class Cache:
        length = 0

        def reorder(self, index):
            pass  # the script depends on the position only

    def encode(self, src_ids, src_mask=None):
        return src_ids[:, :1, None].float()  # (b, 1, 1): the row's script length

    def new_cache(self):
        return self.Cache()

    def decode(self, tgt_ids, memory, src_mask=None, tgt_mask=None, cache=None):
        b, t = tgt_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.length += t
        position = torch.arange(start, start + t, dtype=torch.float)[None, :, None]
        return torch.cat([position.expand(b, t, 1), memory.expand(b, t, 1)], dim=-1)

    def logits(self, hidden):
        position, script = hidden[..., 0], hidden[..., 1]
        out = torch.zeros(*hidden.shape[:2], 8)
        out[..., 5] = (position < script).float()
        out[..., EOS] = (position >= script).float()
        return out


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_rows_stop_at_eos_and_are_padded(method):
    src = torch.tensor([[2, 9], [0, 9], [4, 9]])
    out = generate(Scripted(), src, max_new_tokens=10, method=method, num_beams=2, top_k=1,
                   **IDS)
    assert out.tolist() == [[5, 5, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 5, 5, 5, EOS]]


def test_stops_at_max_new_tokens_without_eos():
    out = generate(Scripted(), torch.tensor([[9, 1], [1, 1]]), max_new_tokens=4, **IDS)
    assert out.tolist() == [[5, 5, 5, 5], [5, EOS, PAD, PAD]]


def test_ids_default_to_the_model_config():
    model, src = tiny_model(), sources()
    assert torch.equal(generate(model, src, max_new_tokens=5),
                       generate(model, src, max_new_tokens=5, **IDS))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nucleus"), "nucleus.*greedy, beam, sample"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=0), "num_beams"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), sources(), **{**IDS, **kwargs})


def test_multi_task_views_decode_the_same_with_and_without_cache():
    from polytask.core.data.tasks import TaskSpec
    from polytask.heads.build import build_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=10, d_model=16, n_heads=2, n_encoder_layers=2,
                         n_decoder_layers=2, d_ff=32, dropout=0.0, init_std=0.5, max_length=32)
    model = build_model(config, [TaskSpec("a"), TaskSpec("b")],
                        {"strategy": "hierarchical"}).eval()
    src = sources()
    for task in ("a", "b"):
        view = model.for_task(task)
        for method in ("greedy", "beam"):
            fast = generate(view, src, max_new_tokens=6, method=method, num_beams=2)
            slow = generate(view, src, max_new_tokens=6, method=method, num_beams=2,
                            use_cache=False)
            assert torch.equal(fast, slow), (task, method)

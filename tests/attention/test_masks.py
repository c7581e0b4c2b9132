"""Mask helpers: True = may attend; causal masks are aligned to the bottom right."""
import pytest
import torch

from polytask.attention.masks import causal_mask, combine, key_padding_mask, lengths_to_mask


def test_causal_mask_square_is_the_lower_triangle():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_mask_is_bottom_right_aligned():
    # 2 new queries at positions 3 and 4 of a 5-key sequence (decoding with a KV cache).
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False],
                                          [True, True, True, True, True]]
    # More queries than keys: the first two queries see nothing.
    assert causal_mask(4, 2).tolist() == [[False, False], [False, False],
                                          [True, False], [True, True]]


def test_lengths_and_key_padding_masks():
    is_token = lengths_to_mask(torch.tensor([3, 1]), 4)
    assert is_token.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert key_padding_mask(is_token).shape == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="bool"):
        key_padding_mask(is_token.long())
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        key_padding_mask(is_token[0])


def test_combine_ands_the_user_mask_with_the_causal_mask():
    user = torch.tensor([[True, False, True]])
    assert combine(None, False, 3, 3, torch.device("cpu")) is None
    assert combine(user, False, 3, 3, torch.device("cpu")) is user
    both = combine(user, True, 3, 3, torch.device("cpu"))
    assert torch.equal(both, user & torch.ones(3, 3, dtype=torch.bool).tril())

"""Hand-written attention: scaled dot-product attention with interchangeable backends,
multi-head attention with grouped-query heads and a KV cache."""
from attention.functional import scaled_dot_product_attention
from attention.masks import causal_mask, key_padding_mask, lengths_to_mask

__all__ = ["scaled_dot_product_attention", "causal_mask", "key_padding_mask", "lengths_to_mask"]

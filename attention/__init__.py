"""Hand-written attention: scaled dot-product attention with interchangeable backends
(reference, chunked, sdpa, triton), multi-head attention with grouped-query heads and a KV
cache for incremental decoding."""
from attention.functional import BACKENDS, CHOICES, scaled_dot_product_attention
from attention.kv_cache import KVCache
from attention.masks import causal_mask, key_padding_mask, lengths_to_mask
from attention.multihead import MultiHeadAttention

__all__ = ["scaled_dot_product_attention", "BACKENDS", "CHOICES", "MultiHeadAttention", "KVCache",
           "causal_mask", "key_padding_mask", "lengths_to_mask"]

"""Hand-written attention: scaled dot-product attention with interchangeable backends
(reference, chunked, sdpa, triton), multi-head attention with grouped-query heads and a KV
cache for incremental decoding."""

if not __name__.startswith("polytask."):  # the checkout's folder imported under its bare name
    raise ImportError(f"import polytask.{__name__}, not {__name__}: the package is installed as "
                      f"polytask.{__name__} (pip install -e .); a second copy under the bare "
                      "name would hold second copies of every registry")

from polytask.attention.functional import BACKENDS, CHOICES, scaled_dot_product_attention
from polytask.attention.kv_cache import KVCache
from polytask.attention.masks import causal_mask, key_padding_mask, lengths_to_mask
from polytask.attention.multihead import MultiHeadAttention

__all__ = ["scaled_dot_product_attention", "BACKENDS", "CHOICES", "MultiHeadAttention", "KVCache",
           "causal_mask", "key_padding_mask", "lengths_to_mask"]

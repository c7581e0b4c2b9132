"""Autoregressive decoding: greedy, sampling, beam search, and the fast cached step."""

"""The encoder-decoder backbone: config, norms, positions, feed-forward, layers, stacks."""

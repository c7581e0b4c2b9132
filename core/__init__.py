"""polytask core package: configuration and the encoder-decoder backbone."""
from core.config import ModelConfig
from core.feedforward import FeedForward, GatedFeedForward, build_feedforward
from core.layers import DecoderLayer, EncoderLayer, LayerCache
from core.norms import LayerNorm, RMSNorm, build_norm
from core.positions import (LearnedPositions, RelativePositionBias, RotaryEmbedding,
                            SinusoidalPositions, build_positions)
from core.transformer import (Decoder, DecoderCache, Encoder, EncoderDecoder, count_parameters)

__all__ = [
    "ModelConfig", "FeedForward", "GatedFeedForward", "build_feedforward", "DecoderLayer",
    "EncoderLayer", "LayerCache", "LayerNorm", "RMSNorm", "build_norm", "LearnedPositions",
    "RelativePositionBias", "RotaryEmbedding", "SinusoidalPositions", "build_positions",
    "Decoder", "DecoderCache", "Encoder", "EncoderDecoder", "count_parameters",
]

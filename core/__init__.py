"""polytask core package: configuration and the encoder-decoder backbone."""

if not __name__.startswith("polytask."):  # the checkout's folder imported under its bare name
    raise ImportError(f"import polytask.{__name__}, not {__name__}: the package is installed as "
                      f"polytask.{__name__} (pip install -e .); a second copy under the bare "
                      "name would hold second copies of every registry")

from polytask.core.model.config import ModelConfig
from polytask.core.model.feedforward import FeedForward, GatedFeedForward, build_feedforward
from polytask.core.model.layers import DecoderLayer, EncoderLayer, LayerCache
from polytask.core.model.norms import LayerNorm, RMSNorm, build_norm
from polytask.core.model.positions import (LearnedPositions, RelativePositionBias, RotaryEmbedding,
                            SinusoidalPositions, build_positions)
from polytask.core.model.transformer import (Decoder, DecoderCache, Encoder, EncoderDecoder, count_parameters)

__all__ = [
    "ModelConfig", "FeedForward", "GatedFeedForward", "build_feedforward", "DecoderLayer",
    "EncoderLayer", "LayerCache", "LayerNorm", "RMSNorm", "build_norm", "LearnedPositions",
    "RelativePositionBias", "RotaryEmbedding", "SinusoidalPositions", "build_positions",
    "Decoder", "DecoderCache", "Encoder", "EncoderDecoder", "count_parameters",
]

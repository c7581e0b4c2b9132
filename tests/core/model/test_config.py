"""ModelConfig fails loudly and names the key, the value and the choices."""
import pytest

from polytask.core.model.config import ModelConfig


def test_defaults_are_valid_and_round_trip():
    cfg = ModelConfig()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.head_dim == cfg.d_model // cfg.n_heads and cfg.kv_heads == cfg.n_heads


def test_unknown_key_is_named_with_the_known_keys():
    with pytest.raises(ValueError, match=r"unknown config key model\.d_modle; known keys: .*d_model"):
        ModelConfig.from_dict({"d_modle": 64})


@pytest.mark.parametrize("key, value", [("norm", "batchnorm"), ("activation", "swish"),
                                        ("positions", "alibi"), ("norm_position", "middle"),
                                        ("attention_backend", "cuda")])
def test_bad_choice_names_key_value_and_choices(key, value):
    with pytest.raises(ValueError, match=rf"model\.{key} = '{value}' is invalid: expected one of"):
        ModelConfig.from_dict({key: value})


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match=r"model\.d_model = '64' is invalid: expected int"):
        ModelConfig(d_model="64")


def test_n_heads_must_divide_d_model():
    with pytest.raises(ValueError, match=r"model\.n_heads \(3\) must divide model\.d_model \(64\)"):
        ModelConfig(d_model=64, n_heads=3)
    assert ModelConfig(d_model=64, n_heads=3, d_head=16).head_dim == 16  # T5 allows any d_head


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"model\.n_kv_heads \(3\) must be positive and divide"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("key, value, message", [
    ("d_model", 0, r"model\.d_model = 0 must be positive"),
    ("dropout", 1.0, r"model\.dropout = 1.0 must be in \[0, 1\)"),
    ("pad_id", 10, r"model\.pad_id = 10 must be in \[0, vocab_size=10\)"),
])
def test_out_of_range_values_are_named(key, value, message):
    kwargs = {"vocab_size": 10, "bos_id": 1, "eos_id": 2, key: value}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_impossible_combinations_are_rejected():
    with pytest.raises(ValueError, match="rope needs an even head size, got 5"):
        ModelConfig(d_model=10, n_heads=2, positions="rope")
    with pytest.raises(ValueError, match="rescale_tied_output needs model.tie_embeddings"):
        ModelConfig(rescale_tied_output=True, tie_embeddings=False)

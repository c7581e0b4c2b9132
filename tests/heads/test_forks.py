"""``fork``: new module objects, the same tensors."""
import torch

from polytask.core.model.config import ModelConfig
from polytask.core.model.layers import EncoderLayer
from polytask.heads.forks import fork, shares_all


def _layer():
    torch.manual_seed(0)
    return EncoderLayer(ModelConfig(d_model=16, n_heads=2, d_ff=32, vocab_size=50, dropout=0.0))


def test_fork_shares_every_tensor_but_no_module_object():
    layer = _layer()
    mine = fork(layer)
    assert shares_all(layer, mine)
    assert mine is not layer and mine.ffn is not layer.ffn
    assert mine.self_attn.q_proj is not layer.self_attn.q_proj
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mine(x), layer(x), rtol=0, atol=0)


def test_replacing_a_child_of_the_fork_leaves_the_original_alone():
    layer = _layer()
    original_ffn = layer.ffn
    mine = fork(layer)
    mine.ffn = torch.nn.Identity()
    assert layer.ffn is original_ffn and not shares_all(layer, mine)


def test_an_update_through_the_fork_updates_the_original():
    layer = _layer()
    mine = fork(layer)
    mine(torch.randn(2, 5, 16)).sum().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None for g in grads)
    with torch.no_grad():
        mine.ffn_norm.weight.add_(1.0)
    assert torch.equal(layer.ffn_norm.weight, mine.ffn_norm.weight)
    container = torch.nn.ModuleList([layer, mine])
    assert len(list(container.parameters())) == len(list(layer.parameters()))

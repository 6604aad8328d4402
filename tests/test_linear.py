import pytest
import torch
import torch.nn.functional as F

from seq2seq import linear as packing
from seq2seq.linear import Linear, linear, packed_weights

needs_mkl = pytest.mark.skipif(not packing._MKL, reason="MKL's packed GEMM is not in this torch build")


def _packs() -> dict:
    scope = packing._scope.get()
    return {} if scope is None else scope[1]


@needs_mkl
@pytest.mark.parametrize("bias", [False, True])
def test_inside_the_block_inputs_of_its_row_count_use_packed_weights_and_match_f_linear(bias):
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48) if bias else None
    x2, x3 = torch.randn(6, 64), torch.randn(3, 2, 64)  # 6 rows either way
    with torch.no_grad(), packed_weights(6):
        got2, got3, got_slice = linear(x2, w, b), linear(x3, w, b), linear(x2, w[16:], None)
        assert len(_packs()) == 2  # w and its slice, each packed once
    torch.testing.assert_close(got2, F.linear(x2, w, b))
    torch.testing.assert_close(got3, F.linear(x3, w, b))
    torch.testing.assert_close(got_slice, F.linear(x2, w[16:]))
    assert _packs() == {}


def test_other_row_counts_gradients_autocast_and_no_block_are_plain_f_linear():
    torch.manual_seed(0)
    layer = Linear(64, 48)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
        assert torch.equal(layer(x), expected)
        with packed_weights(6):
            assert torch.equal(layer(x), expected)
            assert _packs() == {}
    with packed_weights(5):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        out = layer(x)
        assert out.requires_grad and _packs() == {}
    out.sum().backward()
    assert layer.weight.grad is not None


def test_linear_keeps_nn_linear_state_dict_keys():
    assert Linear(4, 3).state_dict().keys() == torch.nn.Linear(4, 3).state_dict().keys()


@needs_mkl
def test_packs_are_kept_between_blocks_and_made_again_when_the_weight_or_row_count_changes():
    torch.manual_seed(0)
    layer, x = Linear(64, 48), torch.randn(6, 64)
    with torch.no_grad():
        with packed_weights(6):
            first = layer(x)
        pack = packing._kept[layer.weight][(0, layer.weight.shape, layer.weight.stride())][2]
        with packed_weights(6):
            assert torch.equal(layer(x), first)
        assert packing._kept[layer.weight][(0, layer.weight.shape, layer.weight.stride())][2] is pack
        layer.weight.mul_(2)  # an optimizer step or load_state_dict changes weights in place
        with packed_weights(6):
            torch.testing.assert_close(layer(x) - layer.bias, 2 * (first - layer.bias))
        with packed_weights(3):
            torch.testing.assert_close(layer(x[:3]), F.linear(x[:3], layer.weight, layer.bias))
        assert packing._kept[layer.weight][(0, layer.weight.shape, layer.weight.stride())][0] == 3

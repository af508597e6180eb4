"""Tests of pose_node.arrays.numpy_or_torch: which arguments it converts, to what, and back."""
import numpy as np
import torch

from pose_node.arrays import numpy_or_torch


@numpy_or_torch
def received(*args, **kwargs):
    """Everything the implementation was handed, as a tuple (so the results show the inputs)."""
    return (*args, *kwargs.values())


@numpy_or_torch
def sum_and_difference(a, b, scale: float = 1.0):
    return scale * (a + b), scale * (a - b)


def test_numpy_in_gives_float64_numpy_out_whatever_the_input_dtype():
    total, difference = sum_and_difference(np.array([1, 2, 3]),
                                           np.array([0.5, 0.25, 0.125], dtype=np.float32), 2.0)
    for out in (total, difference):
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(total, [3.0, 4.5, 6.25])
    np.testing.assert_array_equal(difference, [1.0, 3.5, 5.75])


def test_numpy_arrays_reach_the_implementation_as_float64_tensors():
    inside = []

    @numpy_or_torch
    def spy(a, b):
        inside.extend([a, b])
        return a

    spy(np.arange(3, dtype=np.int32), b=np.array(7.0, dtype=np.float32))
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in inside)
    assert inside[1].shape == ()  # a 0-d array stays 0-d


def test_float64_numpy_is_viewed_but_read_only_and_reversed_arrays_are_copied():
    writable = np.arange(6.0)
    assert np.shares_memory(received(writable)[0], writable)
    read_only = np.arange(6.0)
    read_only.flags.writeable = False
    (out,) = received(read_only)
    assert not np.shares_memory(out, read_only)
    np.testing.assert_array_equal(out, read_only)
    np.testing.assert_array_equal(received(writable[::-1])[0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0])


def test_torch_in_gives_torch_out_with_its_dtype_and_gradient():
    a = torch.tensor([1.0, 2.0], dtype=torch.float32, requires_grad=True)
    b = torch.tensor([0.5, 0.5], dtype=torch.float32)
    total, difference = sum_and_difference(a, b, scale=3.0)
    assert isinstance(total, torch.Tensor) and total.dtype == torch.float32
    np.testing.assert_allclose(difference.detach().numpy(), [1.5, 4.5])
    (total.sum() + 2 * difference.sum()).backward()
    np.testing.assert_allclose(a.grad.numpy(), [9.0, 9.0])  # 3 + 2 * 3 per element


def test_mixed_arguments_become_tensors_like_the_first_tensor():
    first = torch.zeros(2, dtype=torch.float32)
    later = torch.zeros(2, dtype=torch.float64)
    as_numpy = np.array([1.5, 2.5])
    out = received(as_numpy, first, later, keyword=np.array([3, 4]))
    converted, keyword = out[0], out[3]
    assert isinstance(converted, torch.Tensor) and converted.dtype == torch.float32
    assert converted.device == first.device
    np.testing.assert_array_equal(converted.numpy(), [1.5, 2.5])
    assert keyword.dtype == torch.float32 and keyword.tolist() == [3.0, 4.0]
    assert out[1] is first and out[2] is later  # tensors are never converted

    # A keyword tensor decides as well, and the gradient reaches it through the numpy operand.
    points = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    total, _ = sum_and_difference(np.array([10.0, 20.0]), b=points)
    assert isinstance(total, torch.Tensor) and total.dtype == torch.float64
    total.sum().backward()
    np.testing.assert_array_equal(points.grad.numpy(), [1.0, 1.0])


def test_non_array_arguments_pass_through_untouched():
    rng = np.random.default_rng(0)
    values = [3, 0.25, rng, [1, 2], 'name', None, np.float64(1.5)]
    for backend_argument in (np.zeros(1), torch.zeros(1)):
        out = received(backend_argument, *values)
        assert all(o is v for o, v in zip(out[1:], values))

"""One convention for functions that take numpy arrays or torch tensors: write the maths once in
torch and decorate it with :func:`numpy_or_torch`.

- If any argument is a ``torch.Tensor``, the call runs in torch: numpy arguments become tensors on
  the first tensor's device and dtype (so a numpy ``K`` can meet torch points), and the results are
  tensors, differentiable where the inputs are.
- Otherwise numpy arguments become float64 tensors (integers included; zero-copy when they already
  are float64), and the results come back as float64 numpy arrays.

Only top-level arguments of type ``np.ndarray`` are converted; everything else (python numbers,
``np.random.Generator``, lists, strings) reaches the function untouched.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def numpy_or_torch(fn: Callable) -> Callable:
    """Decorate the torch implementation ``fn`` so it also serves numpy callers (module doc)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        like = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        result = fn(*(_to_tensor(a, like) for a in args),
                    **{k: _to_tensor(v, like) for k, v in kwargs.items()})
        return result if like is not None else _to_numpy(result)

    return wrapper


def _to_tensor(value: Any, like: torch.Tensor | None) -> Any:
    """``value`` as a tensor if it is a numpy array: float64, or on ``like``'s device and dtype."""
    if not isinstance(value, np.ndarray):
        return value
    if like is None:
        return torch.from_numpy(_viewable(value, np.float64))
    return torch.as_tensor(_viewable(value, None), dtype=like.dtype, device=like.device)


def _viewable(array: np.ndarray, dtype: type | None) -> np.ndarray:
    """``array`` (as ``dtype``, None keeping its own) in a form torch can view without copying."""
    # torch cannot view negative strides, and warns on viewing read-only memory (Camera.K is).
    array = np.asarray(array, dtype=dtype, order='C')
    return array if array.flags.writeable else array.copy()


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, tuple):
        return tuple(_to_numpy(v) for v in value)
    return value

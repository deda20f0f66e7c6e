"""Axis bookkeeping shared by the predictors (Neural Tangents' kernel layout).

A kernel between inputs of output shape `(N, X, ..., C)` is stored with the
axes of the two inputs interleaved, `(N, N', X, X', ...)`, and without the
`trace_axes` (by default the channel axis `C`), which stand for `K ⊗ I_C`.
"""

from __future__ import annotations

import collections
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Axes = Union[int, Sequence[int]]
Get = Union[None, str, Tuple[str, ...]]


def canonicalize_axis(axis: Axes, ndim: int) -> Tuple[int, ...]:
  """Sorted non-negative axes, as NT's `utils.canonicalize_axis`."""
  axis = [axis] if isinstance(axis, int) else list(axis)
  return tuple(sorted(set(int(a) for a in np.arange(ndim)[axis])))


def get_axes(ndim: int) -> Tuple[Tuple[int, ...], ...]:
  """`(even, odd, first_half, last_half)` axes of an interleaved kernel."""
  return (tuple(range(0, ndim, 2)), tuple(range(1, ndim, 2)),
          tuple(range(0, ndim // 2)), tuple(range(ndim // 2, ndim)))


def zip_axes(x: jax.Array, start_axis: int = 0) -> jax.Array:
  """`[..., X, Y, X', Y'] -> [..., X, X', Y, Y']` from `start_axis` on."""
  half = (x.ndim - start_axis) // 2
  return jnp.moveaxis(x, range(x.ndim - half, x.ndim),
                      range(start_axis + 1, x.ndim, 2))


def make_2d(x: jax.Array) -> jax.Array:
  """Interleaved kernel `(N, N', X, X', ...)` -> matrix `(N X ..., N' X' ...)`."""
  if x.ndim == 2:
    return x
  half = x.ndim // 2
  x = jnp.moveaxis(x, range(1, x.ndim, 2), range(half, x.ndim))
  return x.reshape((int(np.prod(x.shape[:half])), -1))


def is_array(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.Array))


def get_attr(k: Any, g: str) -> Any:
  """The `g` (`'nngp'`/`'ntk'`) kernel of an array, namedtuple or `Kernel`."""
  if is_array(k) or hasattr(k, 'matvec'):
    return k
  if isinstance(k, dict):
    v = k.get(g)
  else:
    v = getattr(k, g, None)
  if v is None:
    raise ValueError(f'The kernel {type(k).__name__} has no {g!r} field '
                     f'(or it is None), but {g!r} predictions were requested.')
  return v


def has_attr(k: Any, g: str) -> bool:
  if is_array(k) or hasattr(k, 'matvec'):
    return True
  v = k.get(g) if isinstance(k, dict) else getattr(k, g, None)
  return v is not None


def get_first(k: Any) -> Any:
  """The first of `nngp`, `ntk` present in `k` (or `k` itself)."""
  for g in ('nngp', 'ntk'):
    if has_attr(k, g):
      return get_attr(k, g)
  raise ValueError(f'{type(k).__name__} has neither an `nngp` nor an `ntk` '
                   'kernel.')


def canonicalize_get(get: Get) -> Tuple[bool, Optional[Tuple[str, ...]]]:
  """`(get_is_a_single_string, get_as_tuple)`, as NT's `canonicalize_get`."""
  if get is None:
    return False, None
  if not get:
    raise ValueError('"get" must be non-empty.')
  single = isinstance(get, str)
  get = (get,) if single else tuple(get)
  get = tuple(g.lower() for g in get)
  if len(set(get)) < len(get):
    raise ValueError(f'All entries in "get" must be unique. Got {get}.')
  return single, get


_NAMEDTUPLES = {}


def named_output(name: str, out: dict, single: bool, get: Tuple[str, ...]):
  """A dict of per-`get` results as NT returns it: a value or a namedtuple."""
  if single:
    return out[get[0]]
  key = (name, get)
  if key not in _NAMEDTUPLES:
    _NAMEDTUPLES[key] = collections.namedtuple(name, get)
  return _NAMEDTUPLES[key](*(out[g] for g in get))


def kernel_data_shape(k: Any) -> Tuple[int, ...]:
  """Shape of the first input's non-traced output axes: `k.shape[::2]`."""
  return tuple(k.shape[::2])


def check_kernel_targets(k_train_train: Any, y_train: Any,
                         trace_axes: Tuple[int, ...],
                         name: str = 'k_train_train') -> None:
  """Raises a `ValueError` naming both shapes if they do not fit together.

  `k_train_train` must have the shape of `zip(y.shape, y.shape)` with the
  `trace_axes` of `y_train` absent.
  """
  shape = tuple(k_train_train.shape)
  y_shape = tuple(np.shape(y_train))
  expected = tuple(c for i, c in enumerate(y_shape) if i not in trace_axes)
  if (len(shape) % 2 or shape[::2] != shape[1::2]
      or shape[::2] != expected):
    want = tuple(d for c in expected for d in (c, c))
    raise ValueError(
        f'`{name}` of shape {shape} does not match `y_train` of shape '
        f'{y_shape} with trace_axes={trace_axes}: expected a kernel of shape '
        f'{want} (each non-traced axis of `y_train`, interleaved twice).')


def check_test_kernel(k_test_train: Any, k_train_train: Any,
                      name: str = 'k_test_train') -> None:
  """Raises a `ValueError` if the train axes of `k_test_train` do not fit."""
  shape, train = tuple(k_test_train.shape), tuple(k_train_train.shape)
  if len(shape) != len(train) or shape[1::2] != train[1::2]:
    raise ValueError(
        f'`{name}` of shape {shape} does not match `k_train_train` of shape '
        f'{train}: its odd axes must be the training axes {train[1::2]}.')


def fx_test_shape(y_train: Any, k_test_train: Any,
                  trace_axes: Tuple[int, ...]) -> Tuple[int, ...]:
  """Shape of test outputs: `k_test_train.shape[::2]` with the traced axes."""
  if k_test_train is None:
    return tuple(np.shape(y_train))
  shape = list(k_test_train.shape[::2])
  for i, c in enumerate(np.shape(y_train)):
    if i in trace_axes:
      shape.insert(i, c)
  return tuple(shape)

"""Shared helpers of the empirical kernels: axes, keyword arguments, layouts.

Output kernels follow Neural Tangents' layout: for an output of shape
`(X, Y, Z)`, axes in `trace_axes` are summed over (and the kernel is divided by
their total size), axes in `diagonal_axes` appear once, and every other axis
appears twice, interleaved: `(X1, X2, Y1, Y2, Z1, Z2)`.
"""

from __future__ import annotations

import string
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Axes = Union[int, Sequence[int]]
VMapAxes = Any

LETTERS = string.ascii_letters


class Letters:
  """Hands out fresh einsum letters."""

  def __init__(self):
    self._next = 0

  def __call__(self, n: int = 1) -> List[str]:
    if self._next + n > len(LETTERS):
      raise ValueError('Kernel contraction needs more than 52 einsum indices.')
    out = list(LETTERS[self._next:self._next + n])
    self._next += n
    return out


def canonicalize_axes(axes: Axes, ndim: int) -> Tuple[int, ...]:
  """Non-negative, sorted, unique axes."""
  if isinstance(axes, int):
    axes = (axes,)
  return tuple(sorted({a % ndim for a in axes})) if ndim else ()


def size_at(shape: Sequence[int], axes: Iterable[int]) -> int:
  return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def output_letters(
    ndim: int, trace_axes: Axes, diagonal_axes: Axes, letters: Letters
) -> Tuple[List[str], List[str], List[str]]:
  """Einsum letters of the two outputs' axes and of the kernel, in NT layout.

  Args:
    ndim: number of output axes.
    trace_axes, diagonal_axes: as in `empirical_ntk_fn`.
    letters: source of fresh letters.

  Returns:
    `(o1, o2, out)`: letters for the axes of `f(x1)`, of `f(x2)`, and of the
    kernel.
  """
  trace = canonicalize_axes(trace_axes, ndim)
  diag = canonicalize_axes(diagonal_axes, ndim)
  if set(trace) & set(diag):
    raise ValueError(f'Axes {set(trace) & set(diag)} are both traced and '
                     'diagonal.')
  o1, o2, out = [], [], []
  for i in range(ndim):
    if i in trace:
      (a,) = letters()
      o1.append(a)
      o2.append(a)
    elif i in diag:
      (a,) = letters()
      o1.append(a)
      o2.append(a)
      out.append(a)
    else:
      a, b = letters(2)
      o1.append(a)
      o2.append(b)
      out += [a, b]
  return o1, o2, out


def kernel_shape(shape1: Sequence[int], shape2: Sequence[int], trace_axes: Axes,
                 diagonal_axes: Axes) -> Tuple[int, ...]:
  """Shape of the kernel between outputs of shapes `shape1` and `shape2`."""
  ndim = len(shape1)
  trace = canonicalize_axes(trace_axes, ndim)
  diag = canonicalize_axes(diagonal_axes, ndim)
  out = ()
  for i, (a, b) in enumerate(zip(shape1, shape2)):
    if i in trace:
      continue
    out += (a,) if i in diag else (a, b)
  return out


def einsum(*operands_and_subscripts, out: Sequence[str]) -> jax.Array:
  """`jnp.einsum` from `(array, letters)` pairs, with a memory-aware path.

  The contraction order is chosen by `np.einsum_path` for the fewest FLOPs among
  orders whose intermediates are no larger than the largest of the inputs and
  the output, so structured contractions never build a large intermediate.
  """
  arrays = list(operands_and_subscripts[0::2])
  subs = [''.join(s) for s in operands_and_subscripts[1::2]]
  spec = ','.join(subs) + '->' + ''.join(out)
  if len(arrays) <= 2:
    return jnp.einsum(spec, *arrays, optimize=False if len(arrays) == 1 else True)
  sizes = {}
  for a, s in zip(arrays, subs):
    sizes.update(zip(s, a.shape))
  limit = max([int(np.prod(a.shape)) for a in arrays] +
              [int(np.prod([sizes[c] for c in out]))])
  # Zero-stride stand-ins: einsum_path reads only the shapes.
  shapes = [np.broadcast_to(np.zeros((), np.float32), a.shape) for a in arrays]
  path, _ = np.einsum_path(spec, *shapes, optimize=('optimal', limit))
  if any(len(step) > 2 for step in path[1:]):
    # No pairwise order within the limit (numpy then contracts several
    # operands at once, which jnp.einsum cannot): drop the limit.
    unlimited = 2 ** 62
    path, _ = np.einsum_path(spec, *shapes, optimize=(
        'optimal' if len(arrays) <= 6 else 'greedy', unlimited))
  if any(len(step) > 2 for step in path[1:]):
    path = ['einsum_path'] + [(0, 1)] * (len(arrays) - 1)
  path = path[1:]  # Drop the leading 'einsum_path' marker.
  return jnp.einsum(spec, *arrays, optimize=path)


def contract_outputs(a: jax.Array, b: jax.Array, trace_axes: Axes,
                     diagonal_axes: Axes) -> jax.Array:
  """NT's `_dot_general`: `a ⊗ b` with traced axes summed, per traced entry.

  Args:
    a: `f(x1)`, shape `S1`.
    b: `f(x2)`, shape `S2` (equal to `S1` on traced and diagonal axes).
    trace_axes, diagonal_axes: as in `empirical_nngp_fn`.

  Returns:
    The kernel in NT layout, divided by the size of the traced axes.
  """
  o1, o2, out = output_letters(a.ndim, trace_axes, diagonal_axes, Letters())
  size = size_at(a.shape, canonicalize_axes(trace_axes, a.ndim))
  return einsum(a, o1, b, o2, out=out) / size


def trace_and_diagonal(k: jax.Array, ndim: int, trace_axes: Axes,
                       diagonal_axes: Axes) -> jax.Array:
  """From an unzipped kernel `(*S1, *S2)` to the NT layout (traced, divided)."""
  o1, o2, out = output_letters(ndim, trace_axes, diagonal_axes, Letters())
  size = size_at(k.shape[:ndim], canonicalize_axes(trace_axes, ndim))
  return jnp.einsum(''.join(o1 + o2) + '->' + ''.join(out), k) / size


# Keyword arguments and keys, as NT's `utils.split_kwargs`.


def _x1_is_x2(x1: PyTree, x2: PyTree) -> jax.Array:
  l1, l2 = jax.tree.leaves(x1), jax.tree.leaves(x2)
  if len(l1) != len(l2) or any(jnp.shape(a) != jnp.shape(b)
                               for a, b in zip(l1, l2)):
    return jnp.asarray(False)
  return jnp.all(jnp.asarray([jnp.all(a == b) for a, b in zip(l1, l2)]))


def split_kwargs(kwargs: Dict[str, Any], x1: PyTree,
                 x2: Optional[PyTree]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Splits `apply_fn` keyword arguments between the two inputs, as NT does.

  An `rng` key becomes two keys (equal exactly when `x1 == x2`); a pair
  `(v1, v2)` gives `v1` to `x1` and `v2` to `x2`; anything else goes to both.
  """
  kwargs1, kwargs2 = {}, {}
  for k, v in kwargs.items():
    if k == 'rng' and x2 is not None and v is not None:
      if isinstance(v, tuple) and len(v) == 2:
        key1, key2 = v
      else:
        key1 = v
        key2 = jnp.where(_x1_is_x2(x1, x2), key1, jax.random.fold_in(v, 1))
      kwargs1[k], kwargs2[k] = key1, key2
    elif isinstance(v, tuple) and len(v) == 2:
      kwargs1[k], kwargs2[k] = v
    else:
      kwargs1[k] = kwargs2[k] = v
  return kwargs1, kwargs2


# Batching over examples with `vmap_axes`, as NT's `_get_f_params`.


def canonicalize_vmap_axes(vmap_axes: VMapAxes, x: PyTree, fx: PyTree,
                           kwargs: Dict[str, Any]):
  """`(x_axis, fx_axis, kw_axes)` as pytrees of non-negative ints (or None)."""
  if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
    x_axis, fx_axis, kw_axes = vmap_axes
  else:
    x_axis, fx_axis, kw_axes = vmap_axes, vmap_axes, {}
  if x_axis is None and fx_axis is None and not kw_axes:
    return None, None, {}
  if isinstance(x_axis, int):
    x_axis = jax.tree.map(lambda a: x_axis % jnp.ndim(a), x)
  else:
    x_axis = jax.tree.map(lambda ax, a: ax % jnp.ndim(a), x_axis, x)
  if isinstance(fx_axis, int):
    fx_axis = jax.tree.map(lambda a: fx_axis % len(a.shape), fx)
  else:
    fx_axis = jax.tree.map(lambda ax, a: ax % len(a.shape), fx_axis, fx)
  kw_axes = dict(kw_axes or {})
  return x_axis, fx_axis, kw_axes


def per_example_fn(f: Callable, x_axis: PyTree, fx_axis: PyTree,
                   kw_axes: Dict[str, Any]) -> Callable:
  """`g(params, x_i, **kw_i)`: `f` on one example (its batch axis of size 1)."""

  def g(params, x, **kwargs):
    x = jax.tree.map(jnp.expand_dims, x, x_axis)
    kwargs = {k: (jax.tree.map(jnp.expand_dims, v, kw_axes[k])
                  if k in kw_axes else v) for k, v in kwargs.items()}
    fx = f(params, x, **kwargs)
    return jax.tree.map(lambda a, ax: jnp.squeeze(a, ax), fx, fx_axis)

  return g


def vmap_in_axes(x_axis: PyTree, kw_axes: Dict[str, Any],
                 kwargs: Dict[str, Any]) -> Tuple[PyTree, Dict[str, Any]]:
  return x_axis, {k: kw_axes.get(k, None) for k in kwargs}


def std_basis(outs: Sequence[Any]) -> List[jax.Array]:
  """Rows of the identity over the concatenated flattened outputs.

  Args:
    outs: arrays or shape-dtype structs.

  Returns:
    One array per output, `(sum of sizes, *shape)`, in that output's dtype.
  """
  sizes = [int(np.prod(o.shape, dtype=np.int64)) for o in outs]
  eye = jnp.eye(sum(sizes), dtype=bool)
  parts = jnp.split(eye, np.cumsum(sizes)[:-1], axis=1)
  return [p.reshape((sum(sizes),) + tuple(o.shape)).astype(o.dtype)
          for p, o in zip(parts, outs)]


def split_rows(a: jax.Array, shapes: Sequence[Tuple[int, ...]]) -> List[jax.Array]:
  """Splits the leading basis axis of `a` into one `(*shape, ...)` per output."""
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  parts = jnp.split(a, np.cumsum(sizes)[:-1], axis=0)
  return [p.reshape(tuple(s) + a.shape[1:]) for p, s in zip(parts, shapes)]


def result_dtype(params: PyTree):
  dtypes = [jnp.result_type(l) for l in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.result_type(l), jnp.inexact)]
  return jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)

"""Kernel computation on blocks of input pairs.

For spatial kernels the per-pair intermediates (`(n1, n2, *S)`, with `S` up to
`(H·W)²` entries) dominate time and memory. Computing them for row blocks of
the two batches in sequence (`lax.map`) keeps each block's intermediates small
(measured on the 21-layer CNNs of `benchmarks/`: 1.1-1.8x faster), and when
the two batches are the same inputs only the blocks on and above the diagonal
are computed; the others are their transposes.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain.kernel import Kernel

#: Per-pair intermediate entries aimed at for one block (1 MiB in float32).
TARGET_BLOCK_ENTRIES = 2 ** 18
#: Fewest rows per block: the per-input statistics of a block's rows and
#: columns are recomputed in every block, 2/rows of its cross work.
MIN_BLOCK_ROWS = 8


def block_rows(n1: int, n2: int, entries_per_pair: int) -> Optional[int]:
  """Rows (and columns) per block, or None to compute all pairs at once.

  Kernels without spatial structure (one entry per pair) are not blocked:
  their cost is one pass over `(n1, n2)`, which assembling blocks would double.
  """
  if entries_per_pair <= 1:
    return None
  rows = 2 ** round(math.log2(math.sqrt(TARGET_BLOCK_ENTRIES / entries_per_pair)))
  rows = max(MIN_BLOCK_ROWS, rows)
  return None if rows >= max(n1, n2) else rows


def blocked_kernel(pair_fn: Callable, x1, x2, rows: int):
  """`pair_fn(x1, x2)` (a pytree of `Kernel`s) computed on `rows`-sized blocks.

  Args:
    pair_fn: the kernels of two batches `(n, ...)`, `(n', ...)` as separate
      inputs (`x1_is_x2=False`).
    x1: `(N1, ...)` inputs (or a pytree of them).
    x2: `(N2, ...)` inputs (the same structure), or None for the kernel of `x1` with itself.
    rows: block size (at most the batch size on each side).

  With `x2=None` only blocks on and above the diagonal are computed. With an
  `x2` of the same shape, the same holds when `x2` equals `x1` at run time;
  derivatives are then those of the full computation (the partial derivatives
  in `x1` and `x2` differ even where the values are symmetric).
  """
  if x2 is None:
    return _blocks(pair_fn, x1, x1, rows, symmetric=True)
  if _shapes(x1) != _shapes(x2):
    return _blocks(pair_fn, x1, x2, rows, symmetric=False)

  @jax.custom_jvp
  def kernel(a, b):
    equal = [jnp.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a),
                                                   jax.tree_util.tree_leaves(b))]
    return _blocks(pair_fn, a, b, rows, symmetric=jnp.all(jnp.stack(equal)))

  @kernel.defjvp
  def _(primals, tangents):
    return jax.jvp(lambda a, b: _blocks(pair_fn, a, b, rows, symmetric=False), primals, tangents)

  return kernel(x1, x2)


def _shapes(x):
  return [jnp.shape(l) for l in jax.tree_util.tree_leaves(x)], jax.tree_util.tree_structure(x)


def _batch_size(x) -> int:
  return jax.tree_util.tree_leaves(x)[0].shape[0]


def _split(x, rows: int):
  """Each leaf `(N, ...)` → `(B, rows, ...)`, padding with copies of the last row."""
  return jax.tree_util.tree_map(lambda l: _split_leaf(l, rows), x)


def _split_leaf(x, rows: int):
  n_blocks = -(-x.shape[0] // rows)
  pad = n_blocks * rows - x.shape[0]
  if pad:
    x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,) + x.shape[1:])])
  return x.reshape((n_blocks, rows) + x.shape[1:])


def _blocks(pair_fn, x1, x2, rows, symmetric):
  """The blocked computation. `symmetric`: True (static: upper blocks only),
  False, or a traced bool (all blocks visited; lower ones skipped when true)."""
  n1, n2 = _batch_size(x1), _batch_size(x2)
  b1, b2 = _split(x1, min(rows, n1)), _split(x2, min(rows, n2))
  nb1, nb2 = _batch_size(b1), _batch_size(b2)
  static_upper = symmetric is True
  pairs = [(i, j) for i in range(nb1) for j in range(nb2) if not static_upper or i <= j]
  index = {p: t for t, p in enumerate(pairs)}
  ii, jj = (np.array(v, np.int32) for v in zip(*pairs))
  skip = None if isinstance(symmetric, bool) else symmetric

  def one(ij):
    i, j = ij
    compute = lambda: pair_fn(jax.tree_util.tree_map(lambda l: l[i], b1),
                              jax.tree_util.tree_map(lambda l: l[j], b2))
    if skip is None:
      return compute()
    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(compute))
    return jax.lax.cond(skip & (i > j), lambda: zeros, compute)

  stacked = jax.lax.map(one, (ii, jj))
  # Which computed block holds block (i, j), and whether it is its transpose.
  src = np.array([[index[(min(i, j), max(i, j))] if static_upper else index[(i, j)]
                   for j in range(nb2)] for i in range(nb1)])
  lower = np.arange(nb1)[:, None] > np.arange(nb2)[None, :]
  mirror = lower if static_upper else (None if skip is None else skip & lower)
  row_src = np.array([index[(i, nb2 - 1)] if not static_upper else index[(i, i)]
                      for i in range(nb1)])
  col_src = np.array([index[(0, j)] for j in range(nb2)])

  def assemble(k: Kernel) -> Kernel:
    pair_block = lambda a: _unblock(_mirrored(a[src], mirror), n1, n2)
    cov = lambda a, which: a[which].reshape((-1,) + a.shape[2:])
    shape1 = _with_batch(k.shape1, k.batch_axis, n1)
    shape2 = _with_batch(k.shape2, k.batch_axis, n2)
    return k.replace(nngp=pair_block(k.nngp), ntk=pair_block(k.ntk),
                     cov1=cov(k.cov1, row_src)[:n1],
                     cov2=None if static_upper else cov(k.cov2, col_src)[:n2],
                     x1_is_x2=static_upper, shape1=shape1, shape2=shape2)

  return jax.tree_util.tree_map(assemble, stacked, is_leaf=lambda v: isinstance(v, Kernel))


def _swap_pair(a, lead: int):
  """Block `(.., n, n', s1, s1', s2, s2', ..)` → the kernel with the inputs swapped."""
  perm = list(range(lead)) + [lead + 1, lead]
  for t in range(lead + 2, a.ndim, 2):
    perm += [t + 1, t]
  return jnp.transpose(a, perm)


def _mirrored(grid, mirror):
  """`(B1, B2, n, n, *S)` blocks; where `mirror[i, j]`, block (i, j) is the
  transpose of a computed block, put into place here."""
  if mirror is None:
    return grid
  if isinstance(mirror, np.ndarray):
    source = grid  # static: grid[i, j] holds the computed block (j, i)
  else:
    source = jnp.swapaxes(grid, 0, 1)  # run time: the computed block is at (j, i)
  m = jnp.asarray(mirror).reshape(mirror.shape + (1,) * (grid.ndim - 2))
  return jnp.where(m, _swap_pair(source, 2), grid)


def _unblock(grid, n1: int, n2: int):
  """`(B1, B2, r1, r2, *S)` → `(n1, n2, *S)`."""
  nb1, nb2, r1, r2 = grid.shape[:4]
  full = jnp.swapaxes(grid, 1, 2).reshape((nb1 * r1, nb2 * r2) + grid.shape[4:])
  return full[:n1, :n2]


def _with_batch(shape, batch_axis: int, n: int):
  if not shape:
    return shape
  shape = list(shape)
  shape[batch_axis] = n
  return tuple(shape)

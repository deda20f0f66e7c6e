"""Random masks: values computed from PRNG keys passed to the function (dropout).

A key given in the keyword arguments of `apply_fn` (`rng=key`, Flax's
`rngs={'dropout': key}`) is a `RandomKey`: it stands for a fresh key, so
the bits drawn from it are random, independent of the parameters and i.i.d.
across their entries. Keys derived from it (split, fold_in, slices) are
computed on a fixed stand-in key, which tells equal keys (the same bits)
from different ones (independent bits).

`random_bits(key)` gives `Noise`: the bits' array, followed by the
elementwise maps applied to it (JAX's uniform draws, a comparison with the
keep probability) and the structural ones (broadcasts, reshapes) that move
its entries; `Noise.index` says which entry of the bits each entry holds.
Where it meets a wide value, the map is resolved into a piecewise-constant
function of the bits (`resolve`): a mask takes two values, with the
probabilities that the bits give. A `NoiseSource` (domain/values.py) is
such a function of one array of bits, i.i.d. across the entries that hold
different bits; `noise_pair` gives the second moments of two of them
(docs/semantics.md, "Dropout").
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain import values as A
from infwidth.domain.errors import UnsupportedValueError

#: Grid points per refinement when locating where a mask changes value.
GRID = 2 ** 16
#: Most values a function of the bits may take (a mask takes two).
MAX_PIECES = 8


def is_key(leaf) -> bool:
  """A PRNG key: a typed key array, or raw key data (`uint32` with a last axis of 2)."""
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None or not hasattr(leaf, 'shape'):
    return False
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  return dtype == jnp.uint32 and len(leaf.shape) >= 1 and leaf.shape[-1] == 2


@dataclasses.dataclass(frozen=True, eq=False)
class RandomKey:
  """A PRNG key (or key data) derived from a key passed to the function.

  `det` holds the stand-in key computed along the same derivation: equal
  stand-ins are the same key.
  """
  det: Any

  @property
  def shape(self):
    return self.det.shape


class NoiseStream:
  """One array of random bits, `random_bits(key, shape)`: a leaf of its own
  (no parameter shares it; its NTK weight is 0)."""

  def __init__(self, shape, bit_width: int, name: str):
    self.shape = tuple(shape)
    self.bit_width = bit_width
    self.leaf = A.ParamLeaf(-3, name, (), 0.0, 1.0, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Noise:
  """`program(bits)[index]`: an elementwise map of a stream's bits, with
  the entries moved by `index` (an integer array of the value's shape: the
  flat position of the bits each entry holds).

  `program` is a tuple of `(primitive, params, operands)`; an operand is
  `('bits',)`, `('node', j)` or `('const', array)`.
  """
  stream: NoiseStream
  index: np.ndarray
  program: Tuple[Any, ...] = ()

  @property
  def shape(self):
    return tuple(self.index.shape)

  def moved(self, index) -> 'Noise':
    return dataclasses.replace(self, index=np.asarray(index))

  def mapped(self, prim, params, operands) -> 'Noise':
    """The noise with one more elementwise primitive: `operands` holds
    `self` where the noise enters and concrete scalars elsewhere."""
    ops = []
    for o in operands:
      if o is self:
        ops.append(('node', len(self.program) - 1) if self.program else ('bits',))
      else:
        ops.append(('const', np.asarray(o)))
    return dataclasses.replace(self, program=self.program + ((prim, dict(params), tuple(ops)),))


def _evaluate(program, bits):
  """The program on an array of bit values (concrete)."""
  outs = []
  for prim, params, operands in program:
    vals = []
    for o in operands:
      if o[0] == 'bits':
        vals.append(bits)
      elif o[0] == 'node':
        vals.append(outs[o[1]])
      else:
        vals.append(jnp.broadcast_to(jnp.asarray(o[1]).reshape(()), bits.shape))
    outs.append(prim.bind(*vals, **params))
  return np.asarray(outs[-1]) if outs else np.asarray(bits)


@dataclasses.dataclass(frozen=True)
class Piecewise:
  """A function of the bits `b ∈ [0, 2^w)`: `values[k]` on `[breaks[k], breaks[k+1])`
  (`breaks` start at 0 and end at `2^w`)."""
  breaks: Tuple[int, ...]
  values: Tuple[float, ...]

  def probabilities(self) -> Tuple[float, ...]:
    total = self.breaks[-1]
    return tuple((hi - lo) / total for lo, hi in zip(self.breaks[:-1], self.breaks[1:]))

  def at(self, b: int) -> float:
    return self.values[bisect.bisect_right(self.breaks, b) - 1]

  def mean(self) -> float:
    return float(sum(p * v for p, v in zip(self.probabilities(), self.values)))

  def map(self, f) -> 'Piecewise':
    return Piecewise(self.breaks, tuple(float(f(v)) for v in self.values))


def merged(*fns: Piecewise) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
  """The common refinement of several functions of the same bits: its
  interval starts and their probabilities."""
  starts = sorted(set(b for f in fns for b in f.breaks[:-1]))
  total = fns[0].breaks[-1]
  ends = starts[1:] + [total]
  return tuple(starts), tuple((hi - lo) / total for lo, hi in zip(starts, ends))


def joint_moment(f: Piecewise, g: Piecewise) -> float:
  """`E[f(b) g(b)]` for one draw of the bits."""
  starts, probs = merged(f, g)
  return float(sum(p * f.at(s) * g.at(s) for s, p in zip(starts, probs)))


def resolve(noise: Noise) -> Piecewise:
  """The noise's map as a piecewise-constant function of the bits.

  The map is evaluated on a grid of `GRID + 1` bit values, and each change
  of value is located exactly by refining its bracket. JAX's uniform draws
  are monotone in the bits, so a comparison of one with a constant (a
  Bernoulli mask) changes value once; a map that takes more than
  `MAX_PIECES` values (Gaussian or uniform noise itself) is refused.
  """
  w = noise.stream.bit_width
  dtype = np.dtype(f'uint{w}')
  top = 2 ** w

  def grid(lo, hi):
    """Bit values from lo to hi (inclusive), at most GRID + 1 of them."""
    n = min(GRID, hi - lo)
    pts = [lo + (hi - lo) * k // n for k in range(n + 1)]
    return np.array(pts, dtype=dtype)

  def values(pts):
    with jax.ensure_compile_time_eval():
      return _evaluate(noise.program, jnp.asarray(pts))

  pts = grid(0, top - 1)
  vals = values(pts)
  if vals.dtype.kind not in 'biuf':
    raise UnsupportedValueError(f'a random value of dtype {vals.dtype} meets a wide value')
  change = np.nonzero(vals[1:] != vals[:-1])[0]
  if len(change) >= MAX_PIECES:
    raise UnsupportedValueError(
        'a random value that is not a mask (it takes many values: Gaussian or uniform '
        'noise) multiplies a wide value; only masks that take a few values (dropout) '
        'have a kernel rule so far; use fallback="monte_carlo"')
  breaks = [0]
  for i in change:
    lo, hi = int(pts[i]), int(pts[i + 1])  # values differ at lo and hi
    while hi - lo > 1:
      sub = grid(lo, hi)
      sv = values(sub)
      c = np.nonzero(sv[1:] != sv[:-1])[0]
      if len(c) != 1:
        raise UnsupportedValueError(
            'a random value that changes more often than a mask (a threshold of uniform '
            'draws) multiplies a wide value; use fallback="monte_carlo"')
      lo, hi = int(sub[c[0]]), int(sub[c[0] + 1])
    breaks.append(hi)
  breaks.append(top)
  vals_at = [float(vals[0])] + [float(vals[i + 1]) for i in change]
  return Piecewise(tuple(breaks), tuple(vals_at))


def layout(noise: Noise, roles) -> Tuple[bool, Tuple[Any, ...]]:
  """Whether the noise varies along the batch axis, and along which spatial
  roles, when it is aligned with a value of axis `roles`.

  Its entries must hold bits indexed by a one-to-one map of the axes it
  varies along (as a broadcast mask does) and differ along every channel
  axis: a mask shared by the channels would not average out over the width.
  """
  idx = noise.index
  flat = idx.reshape(-1)
  drawn = bool(flat.size) and flat[0] == 0 and bool(np.all(np.diff(flat) == 1))
  if drawn:  # as drawn: all entries distinct
    varies = [n > 1 for n in idx.shape]
  else:
    varies = [bool(np.any(idx != np.take(idx, [0], axis=i))) for i in range(idx.ndim)]
  count = int(np.prod([n for n, v in zip(idx.shape, varies) if v], dtype=int))
  if not drawn and len(np.unique(idx)) != count:
    raise UnsupportedValueError('a random mask whose entries repeat across positions in a '
                                'way other than a broadcast')
  for i, r in enumerate(roles):
    if r == 'c' and idx.shape[i] > 1 and not varies[i]:
      raise UnsupportedValueError(
          'a random mask shared by all channels (broadcast along the channel axis): it does '
          'not average out over the width, so the kernel has no deterministic limit')
    if r is None and varies[i]:
      raise UnsupportedValueError('a random mask that varies along an axis of size one '
                                  'of the value it multiplies')
  batch = any(v for v, r in zip(varies, roles) if r == 'b')
  spatial = tuple(r for v, r in zip(varies, roles) if v and r not in ('b', 'c', None))
  return batch, spatial


def noise_pair(m, a: 'A.NoiseSource', b: 'A.NoiseSource') -> 'A.PairStats':
  """Centred second moments of two functions of the same bits.

  Entries that hold the same bits (the same input of one forward pass, at
  the same position along the axes the mask varies on) have covariance
  `E[f g] − E[f] E[g]`; other entries are independent. Inputs of `x1` and
  `x2` are different entries unless they are the same batch
  (`x1_is_x2`).
  """
  if not a.same_layout(b):
    raise UnsupportedValueError('one random mask used in two different layouts')
  c = joint_moment(a.fn, b.fn) - a.fn.mean() * b.fn.mean()
  sizes = a.sizes
  if m.diag or not sizes:
    pos = None
  else:
    pos = np.ones((1,) * 2 * len(sizes))
    for k, n in enumerate(sizes):
      shape = [1] * 2 * len(sizes)
      shape[k], shape[len(sizes) + k] = n, n
      pos = pos * np.eye(n).reshape(shape)
  # pos: (*R, *R) indicator of equal positions (None: all entries equal).
  spatial_shape = tuple(sizes) if m.diag else tuple(sizes) * 2

  def block(lead_eye):
    """`c · [same input] · [same positions]` with the lead axes `lead_eye`
    (an `(N1, N2)` or `(N,)` array of ones/eye), or a float."""
    arr = np.asarray(lead_eye, np.float64)
    arr = arr.reshape(arr.shape + (1,) * len(spatial_shape))
    if pos is not None:
      arr = arr * pos.reshape((1,) * (arr.ndim - pos.ndim) + pos.shape)
    arr = np.broadcast_to(arr, arr.shape[:arr.ndim - len(spatial_shape)] + spatial_shape)
    return jnp.asarray(c * arr, m.dtype)

  n1, n2 = m.n1, m.n2
  if not spatial_shape:
    cross = float(c) if not a.batch else (
        jnp.asarray(c * np.eye(n1), m.dtype) if m.x1_is_x2 else 0.0)
    return A.PairStats(cross, float(c), float(c))
  if a.batch:
    cross = block(np.eye(n1)) if m.x1_is_x2 else 0.0
  else:
    cross = block(np.ones((n1, n2)))
  return A.PairStats(cross, block(np.ones(n1)), block(np.ones(n2)))

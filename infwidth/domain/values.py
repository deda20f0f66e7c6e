"""The abstract domain of the kernel interpreter (DESIGN §2).

A *wide value* is a tensor with one channel axis whose entries are i.i.d.
across channels in the infinite-width limit. It is a sum of terms

    value = offset(x) + Σ_t  φ_t(u_t, *args_t) · Π_k p_{t,k}

where `u_t` is a Gaussian *combination* of *sources* (outputs of linear maps
with fresh weights, and parameters used elementwise such as biases),
`φ_t` is an elementwise `Chain`, `args_t` are deterministic per-input arrays
or deterministic-valued parameters (a LayerNorm scale of ones), and `p_{t,k}`
are parameters that multiply the term outside the chain.

Everything here is layout-aware but primitive-agnostic: statistics of a value
are arrays in its *canonical layout* `(B, *S)` — the (joint) batch axis, then
its spatial axes, identified by role ids (`'x1'`, …) — and a pair of values
has a cross block `(N1, N2, *S_a, *S_b)` and same-input blocks
`(N1, *S_a, *S_b)`, `(N2, *S_a, *S_b)`.

All second moments are per channel: `E[v_i(x) v'_i(x')]` for one channel `i`;
`infwidth.moments` computes them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain.errors import InternalError, UnsupportedValueError
from infwidth.domain.chain import Chain

Array = Any
_ids = itertools.count()


# ----------------------------------------------------------------------------
# Deterministic arrays.


@dataclasses.dataclass(frozen=True, eq=False)
class Det:
  """A deterministic array over the joint batch, with per-axis roles.

  roles[i]: 'b' (batch), a spatial role id from the input, or None.
  """
  value: Any
  roles: Tuple[Any, ...]
  # The same values with size-1 axes where `value` is a broadcast (a constant
  # along that axis), or None: lets a constant broadcast along the channel
  # axis (`jnp.where(h > 0, h, 0.)`) be used elementwise.
  compact: Any = None

  @property
  def shape(self):
    return tuple(jnp.shape(self.value))


class ChannelArray:
  """A deterministic array that varies along the channel (wide) axis and
  nowhere else: `values[c]` is channel `c`'s entry (BatchNorm's running
  statistics, a fixed per-channel shift or scale).

  It stands where a canonical-layout array may (a combination's coefficient
  or mean, a chain argument, an offset) and broadcasts there like a scalar.
  In the limit the channel table is extended i.i.d. from its empirical
  distribution, all arrays of one channel space jointly (channel `c` reads
  entry `c` of each): the moment engine averages per-channel moments over
  the channels (docs/semantics.md, "Deterministic arrays along a wide axis").
  Arithmetic with floats, size-one arrays and other channel arrays of the
  same length gives channel arrays.

  values: `(n,)`, concrete (NumPy) or traced.
  """
  __array_ufunc__ = None  # NumPy defers to the reflected operators below

  def __init__(self, values):
    self.values = values

  @property
  def n(self) -> int:
    return int(self.values.shape[0])

  @property
  def concrete(self) -> bool:
    return not _is_traced(self.values)

  def _op(self, other, f):
    if isinstance(other, ChannelArray):
      if other.n != self.n:
        raise UnsupportedValueError(
            f'per-channel arrays of {self.n} and {other.n} channels meet on one channel '
            'axis')
      return ChannelArray(f(self.values, other.values))
    if isinstance(other, (int, float)):
      return ChannelArray(f(self.values, other))
    if np.size(other) == 1:
      return ChannelArray(f(self.values, jnp.reshape(other, ()) if _is_traced(other)
                            else np.asarray(other).reshape(())))
    raise UnsupportedValueError(
        'a per-channel array with distinct entries is combined with an array that varies '
        'with the input or the position (e.g. a LayerNorm statistic); only per-channel '
        'arrays that meet the channel axis alone are supported.')

  def __mul__(self, o): return self._op(o, lambda a, b: a * b)
  def __rmul__(self, o): return self._op(o, lambda a, b: b * a)
  def __add__(self, o): return self._op(o, lambda a, b: a + b)
  def __radd__(self, o): return self._op(o, lambda a, b: b + a)
  def __sub__(self, o): return self._op(o, lambda a, b: a - b)
  def __rsub__(self, o): return self._op(o, lambda a, b: b - a)
  def __truediv__(self, o): return self._op(o, lambda a, b: a / b)
  def __rtruediv__(self, o): return self._op(o, lambda a, b: b / a)
  def __neg__(self): return ChannelArray(-self.values)


# ----------------------------------------------------------------------------
# Parameters.


@dataclasses.dataclass(eq=False)
class ParamLeaf:
  """One parameter tensor: its moments, NTK weight and name for messages.

  A slice of a leaf (`W[i]` of weights stacked along a leading axis) is a
  leaf of its own (`parent` set): its entries are other i.i.d. entries with
  the same moments, so distinct slices are independent sources.
  """
  index: int
  name: str
  shape: Tuple[int, ...]
  mean: float
  var: float
  ntk_weight: float
  parent: Optional['ParamLeaf'] = None


@dataclasses.dataclass(frozen=True, eq=False)
class ParamRef:
  """A view of a parameter leaf inside the traced function (`c · W`, transposed…).

  `axes[i]` is the leaf axis that view axis `i` comes from (None for an axis of
  size one added by reshape/broadcast), so contractions know which leaf axes
  they sum. `scale` is the constant factor `c` in front.
  """
  leaf: ParamLeaf
  shape: Tuple[int, ...]
  axes: Tuple[Optional[int], ...]
  scale: float = 1.0

  def scaled(self, c: float) -> 'ParamRef':
    return dataclasses.replace(self, scale=self.scale * c)


# ----------------------------------------------------------------------------
# Sources and Gaussian combinations.


class Source:
  """A Gaussian tensor that is i.i.d. across channels (given the inputs).

  Attributes:
    spatial: role ids of its spatial axes (canonical layout `(B, *spatial)`).
    random: whether it has nonzero variance (static).
    leaf: the parameter leaf whose randomness it carries.
  """
  spatial: Tuple[str, ...]
  random: bool
  leaf: ParamLeaf

  def __init__(self):
    self.uid = next(_ids)


class LinearSource(Source):
  """`z = c · contract(y, W)` over a channel axis (wide input) or finite axes (x).

  Attributes:
    param: the weight view.
    inputs: a `Wide` value (contracted over its channel axis) or a
      deterministic array in canonical layout with contracted axes last:
      shape `(B, *spatial, *contracted)`.
    width: the size of the contracted channel axis (wide input only).
  """

  def __init__(self, param: ParamRef, inputs, spatial, width: int = 1, transform=None,
               traced=(), input_moment=None):
    super().__init__()
    self.param = param
    self.leaf = param.leaf
    self.inputs = inputs
    self.spatial = tuple(spatial)
    self.width = width
    self.random = _maybe_positive(param.leaf.var)
    # transform(block, n_lead): maps input-layout moment blocks to this
    # source's layout (a convolution's joint window sums); None for dense.
    self.transform = transform
    # Spatial roles of a wide input summed together with its channel axis
    # (a dense readout after flattening): the moment is traced over them.
    self.traced = tuple(traced)
    # input_moment(moments, xa, xb) -> PairStats: the contraction of two
    # deterministic inputs where it is not a plain sum over their last axes
    # (a convolution's patches); None for the plain sum.
    self.input_moment = input_moment


class MappedSource(Source):
  """A linear map `P` of a wide value along its spatial axes (pooling, sums).

  Its second moments are `P ⊗ P` applied to the base value's: exact for any
  base. It is Gaussian only when the base is (then it may enter a
  nonlinearity).

  Attributes:
    base: the `Wide` value mapped.
    apply: apply(block, n_lead, side) maps a moment block's side-'a' or
      side-'b' spatial axes from the base's layout to this source's.
  """

  def __init__(self, base, apply, spatial):
    super().__init__()
    self.base = base
    self.apply = apply
    self.spatial = tuple(spatial)
    self.leaf = _MAPPED_LEAF
    self.param = ParamRef(_MAPPED_LEAF, (), ())
    self.random = True
    self.gaussian = (all(t.is_gaussian for t in base.terms) and base.offset is None
                     and not has_noise(base))
    # A map of values with per-channel arrays mixes positions of one channel
    # at a time: its moments are averages over channels, not one Gaussian's.
    self.per_channel = channel_dependent(base)
    self.ops = {}

  @property
  def selection(self) -> bool:
    """Every output position copies at most one input position (slice, pad,
    reversal, wrap): the map then commutes with taking spatial diagonals."""
    for op in self.ops.values():
      if op[0] != 'mat':
        return False
      m = np.asarray(op[1])
      if np.any((m != 0) & (m != 1)) or np.any((m != 0).sum(axis=1) > 1):
        return False
    return True

  def same_map(self, other: 'MappedSource') -> bool:
    keys = lambda ops: {k: (v[0], np.asarray(v[1]).tobytes()) for k, v in ops.items()}
    return self.base is other.base and keys(self.ops) == keys(other.ops)


_MAPPED_LEAF = ParamLeaf(-2, '<spatial map>', (), 0.0, 1.0, 0.0)


class ParamSource(Source):
  """A parameter used elementwise (bias, scale): Gaussian with its moments.

  The leaf's only non-trivial axis is the channel axis: it is shared by every
  input and position.
  """

  def __init__(self, param: ParamRef):
    super().__init__()
    self.param = param
    self.leaf = param.leaf
    self.spatial = ()
    self.random = _maybe_positive(param.leaf.var)

  @property
  def mean(self) -> float:
    return self.param.scale * self.leaf.mean


class KernelSource(Source):
  """A Gaussian input given by its kernels (a `Kernel` in place of `x1`).

  Its channel axis is wide; `nngp`, `cov1`, `cov2` are its second moments and
  `ntk` its NTK, as computed for an earlier function.
  """

  def __init__(self, kernel):
    super().__init__()
    self.kernel = kernel
    self.leaf = ParamLeaf(-1, '<input kernel>', (), 0.0, 1.0, 1.0)
    self.param = ParamRef(self.leaf, (), ())
    self.spatial = ()
    self.random = True


class NoiseSource(Source):
  """A function `fn` of random bits drawn from a key passed to the function
  (a dropout mask), centred: its mean is kept in the combination.

  Its entries are i.i.d. across the entries that hold different bits and
  independent of the parameters; it has no NTK. `batch`: whether it varies
  along the batch axis; `spatial`: the spatial roles it varies along
  (`sizes`); `index`: which bits each entry holds (its layout).

  Attributes:
    stream: the `noise.NoiseStream` of its bits.
    fn: a `noise.Piecewise` function of the bits.
  """

  def __init__(self, stream, fn, batch: bool, spatial, sizes, index):
    super().__init__()
    self.stream = stream
    self.leaf = stream.leaf
    self.param = ParamRef(stream.leaf, (), ())
    self.fn = fn
    self.batch = batch
    self.spatial = tuple(spatial)
    self.sizes = tuple(sizes)
    self.index = index
    self.random = True

  def same_layout(self, other: 'NoiseSource') -> bool:
    return (self.stream is other.stream and self.batch == other.batch
            and self.spatial == other.spatial and self.index.shape == other.index.shape
            and bool(np.all(self.index == other.index)))


def has_noise(w) -> bool:
  """Whether a wide value (or term) depends on a random mask."""
  if isinstance(w, ChannelConcat):
    return any(has_noise(p) for p in w.parts)
  terms = w.terms if isinstance(w, Wide) else (w,)
  for t in terms:
    for c in (t.combo,) + tuple(t.gargs) + tuple(t.pargs):
      for s in c.sources:
        if isinstance(s, NoiseSource) or (isinstance(s, MappedSource) and has_noise(s.base)):
          return True
    if any(has_noise(p) for p in t.cofactors):
      return True
  return False


@dataclasses.dataclass(frozen=True, eq=False)
class Combo:
  """A Gaussian combination `mean + Σ coef_s · s` in a canonical layout.

  `coefs[k]` and `mean` are floats or arrays in canonical layout `(B|1, *S|1)`
  with spatial role ids `spatial`.
  """
  sources: Tuple[Source, ...]
  coefs: Tuple[Any, ...]
  spatial: Tuple[str, ...]
  mean: Any = 0.0

  @property
  def random(self) -> bool:
    return any(s.random for s in self.sources)

  def key(self):
    return (tuple(s.uid for s in self.sources),
            tuple(c if isinstance(c, float) else id(c) for c in self.coefs),
            self.mean if isinstance(self.mean, float) else id(self.mean))


def combo_of(source: Source, spatial) -> Combo:
  mean = source.mean if isinstance(source, ParamSource) else 0.0
  if _is_traced(mean):  # moments traced under jit: a canonical-layout array
    mean = jnp.reshape(mean, (1,) * (1 + len(spatial)))
  else:
    mean = float(mean)
  return Combo((source,), (1.0,), tuple(spatial), mean)


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _maybe_positive(var) -> bool:
  """Whether a variance may be nonzero: a traced one (parameters passed under
  `jax.jit`) is treated as random, which is exact whatever its value."""
  return True if _is_traced(var) else var > 0


def add_combos(a: Combo, b: Combo, sign: float = 1.0) -> Combo:
  """`a + sign·b`, merging coefficients of shared sources."""
  assert a.spatial == b.spatial
  sources, coefs = list(a.sources), list(a.coefs)
  for s, c in zip(b.sources, b.coefs):
    c = _mul(sign, c)
    if s in sources:
      k = sources.index(s)
      coefs[k] = _add(coefs[k], c)
    else:
      sources.append(s)
      coefs.append(c)
  return Combo(tuple(sources), tuple(coefs), a.spatial, _add(a.mean, _mul(sign, b.mean)))


def scale_combo(a: Combo, c, shift=0.0) -> Combo:
  """`c·a + shift` for a float or canonical-layout array `c`."""
  return Combo(a.sources, tuple(_mul(c, k) for k in a.coefs), a.spatial,
               _add(_mul(c, a.mean), shift))


def split_random(a: Combo) -> Tuple[Optional[Combo], Optional[Combo]]:
  """Splits `a` into its random part and its deterministic-valued part.

  A per-channel mean (`ChannelArray`) stays with the random part: the
  Gaussian is then non-centred per channel, which the closed forms of the
  ReLU family handle, where a shift inside the chain would need quadrature.
  """
  rnd = [(s, c) for s, c in zip(a.sources, a.coefs) if s.random]
  det = [(s, c) for s, c in zip(a.sources, a.coefs) if not s.random]
  mk = lambda sc, mean: Combo(tuple(s for s, _ in sc), tuple(c for _, c in sc), a.spatial, mean)
  keep = bool(rnd) and isinstance(a.mean, ChannelArray)
  r = mk(rnd, a.mean if keep else 0.0) if rnd else None
  mean = 0.0 if keep else a.mean
  d = mk(det, mean) if (det or not _is_zero(mean)) else None
  return r, d


def same_combo(a: Combo, b: Combo) -> bool:
  return a is b or a.key() == b.key()


def combo_ratio(a: Combo, b: Combo):
  """`α` with `a = α·b` (zero means), a float or per-input array; None if not proportional.

  Proportionality is decided statically: equal coefficient objects, float
  coefficients with one ratio, or a single shared source.
  """
  if a is b:
    return 1.0
  if [s.uid for s in a.sources] != [s.uid for s in b.sources]:
    return None
  if len(a.sources) == 1 and _is_zero(a.mean) and _is_zero(b.mean):
    ca, cb = a.coefs[0], b.coefs[0]
    if ca is cb:
      return 1.0
    return ca / cb
  ratios = set()
  pairs = list(zip(a.coefs, b.coefs))
  if not (_is_zero(a.mean) and _is_zero(b.mean)):
    pairs.append((a.mean, b.mean))
  for ca, cb in pairs:
    if ca is cb:
      ratios.add(1.0)
    elif isinstance(ca, float) and isinstance(cb, float) and cb != 0.0:
      ratios.add(ca / cb)
    else:
      return None
  return ratios.pop() if len(ratios) == 1 else None


# ----------------------------------------------------------------------------
# Wide values.


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
  """`chain(u, *[p.mean for p in pargs], *dargs) · Π factors` with `u = combo`.

  pargs: deterministic-valued Gaussian combinations (zero-variance parameters)
    entering the chain; they carry NTK contributions.
  dargs: deterministic canonical-layout arrays entering the chain.
  factors: parameter sources multiplying the term outside the chain.
  cofactors: terms multiplying this one, each over its own combination and
    all of them (and this term) mutually independent: `(W₁x) · σ(W₂x)`, a
    gated unit, is one term with one cofactor. Their expectations factorise
    (docs/semantics.md, "Functions of several Gaussian values").
  gargs: further random Gaussian combinations the chain takes after `u`,
    correlated with it or not (`max(h₁, h₂)`, a product of correlated values):
    the chain is `φ(u, *gargs, *pargs, *dargs)` and its expectations are
    joint integrals over all of them.
  """
  chain: Chain
  combo: Combo
  pargs: Tuple[Combo, ...] = ()
  dargs: Tuple[Any, ...] = ()
  factors: Tuple[ParamSource, ...] = ()
  cofactors: Tuple['Term', ...] = ()
  gargs: Tuple[Combo, ...] = ()

  @property
  def is_gaussian(self) -> bool:
    return (self.chain.is_identity and not self.factors and not self.cofactors
            and not self.gargs)

  @property
  def parts(self) -> Tuple['Term', ...]:
    """The independent factors of the term, each without cofactors."""
    if not self.cofactors:
      return (self,)
    return (dataclasses.replace(self, cofactors=()),) + self.cofactors


def term_leaves(t: Term) -> frozenset:
  """Ids of the parameter leaves whose randomness a term depends on: two terms
  without a common leaf are independent in the limit (fresh weights make
  their sources uncorrelated given the layer below, DESIGN §2)."""
  out = set()
  combos = (t.combo,) + tuple(t.gargs) + tuple(t.pargs)
  for c in combos:
    for s in c.sources:
      out |= source_leaves(s)
  for f in t.factors:
    out.add(id(f.leaf))
  for c in t.cofactors:
    out |= term_leaves(c)
  return frozenset(out)


def source_leaves(s: Source) -> frozenset:
  if isinstance(s, MappedSource):  # a map of a wide value: its terms' leaves
    out = set()
    for t in s.base.terms:
      out |= term_leaves(t)
    for part in getattr(s.base, 'parts', ()):
      for t in part.terms:
        out |= term_leaves(t)
    return frozenset(out)
  return frozenset((id(s.leaf),))


@dataclasses.dataclass(frozen=True, eq=False)
class Wide:
  """A wide tensor of logical `shape` with per-axis roles.

  roles[i] is 'b' (batch), 'c' (channel), a spatial role id, or None (size 1).
  Several axes may be channel axes: the entries are i.i.d. over all of them.
  """
  shape: Tuple[int, ...]
  roles: Tuple[Any, ...]
  terms: Tuple[Term, ...]
  offset: Any = None  # canonical-layout array or None
  # (role, size) of spatial axes merged into the channel axis by a reshape
  # (Flatten): they stay in the canonical layout, after the visible ones.
  hidden: Tuple[Any, ...] = ()

  @property
  def spatial(self) -> Tuple[str, ...]:
    return tuple(r for r in self.roles if r not in ('b', 'c', None)) + tuple(
        r for r, _ in self.hidden)

  @property
  def channel_axis(self) -> int:
    """The last channel axis (a weight with several output axes, Flax's
    `DenseGeneral` with `features=(heads, head_dim)`, gives several: its
    entries are i.i.d. over all of them)."""
    return len(self.roles) - 1 - self.roles[::-1].index('c')

  @property
  def width(self) -> int:
    """The number of i.i.d. channels: the product of the channel axes."""
    return int(np.prod([n for n, r in zip(self.shape, self.roles) if r == 'c'], dtype=int))

  def canonical_shape(self, batch: int) -> Tuple[int, ...]:
    if self.hidden:
      raise InternalError('canonical shape of a flattened value')
    b = batch if 'b' in self.roles else 1
    return (b,) + tuple(self.shape[i] for i, r in enumerate(self.roles)
                        if r not in ('b', 'c', None))


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelConcat(Wide):
  """Wide values concatenated along their channel axis (`parts`, same roles).

  Its channels are not identically distributed: a channel of part k has part
  k's kernel. Per-channel moments are averages over the channels (weights
  `n_k / n`), which is what a contraction over the channel axis sums
  (`Σ_c y_c y'_c = Σ_k n_k E[y_k y'_k]`) and what channelwise maps preserve.
  Only rules that know this (channelwise maps, contractions over the channel
  axis) accept it; the interpreter reports any other use. `terms` is empty.
  """
  parts: Tuple[Wide, ...] = ()

  @property
  def fractions(self) -> Tuple[float, ...]:
    return tuple(p.width / self.width for p in self.parts)


@dataclasses.dataclass(frozen=True, eq=False)
class DetChannels(Wide):
  """A deterministic block of a `ChannelConcat`: an input array `x`
  concatenated with wide values along their channel axis
  (`jnp.concatenate([x_t, h], -1)` in an LSTM).

  `value` is the array in the value's layout (`shape`, `roles`), with `D`
  channels. A contraction over the concatenated axis sums `Σ_c x_c x′_c`
  over its channels, so its per-channel moment is `x·x′/D` and the
  concatenation's moment the average weighted by the blocks' sizes
  (docs/semantics.md, "Inputs concatenated with wide values"). It has no
  NTK and, like a Gaussian block, needs no nonlinearity's expectation.
  `terms` is empty; only `ChannelConcat` holds it.
  """
  value: Any = None

  def canonical(self):
    """The array in canonical input layout `(B|1, *S, D)`."""
    v = jnp.asarray(self.value)
    b = [i for i, r in enumerate(self.roles) if r == 'b']
    s = [i for i, r in enumerate(self.roles) if r not in ('b', 'c', None)]
    c = [i for i, r in enumerate(self.roles) if r == 'c']
    rest = [i for i, r in enumerate(self.roles) if r is None]
    v = jnp.transpose(v, b + s + c + rest)
    v = v.reshape(v.shape[:len(b) + len(s)] + (int(np.prod([self.shape[i] for i in c])),))
    return v if b else v[None]


@dataclasses.dataclass(frozen=True, eq=False)
class ParamConcat:
  """Parameter views concatenated along axis `axis` (Flax's
  `OptimizedLSTMCell` concatenates its four gate kernels `(H, H)` into one
  `(H, 4H)`). Each piece stays its own leaf: a contraction gives a
  `ChannelConcat` of the pieces' results, which a split at the piece
  boundaries takes apart again.
  """
  pieces: Tuple[ParamRef, ...]
  shape: Tuple[int, ...]
  axis: int

  @property
  def widths(self) -> Tuple[int, ...]:
    return tuple(p.shape[self.axis] for p in self.pieces)


# ----------------------------------------------------------------------------
# Per-channel arrays inside wide values.


def _term_slots(t: Term):
  """Every coefficient, mean and argument of a term (its cofactors included):
  the places a `ChannelArray` may stand."""
  for c in (t.combo,) + tuple(t.pargs) + tuple(t.gargs):
    for k in c.coefs + (c.mean,):
      yield k
  yield from t.dargs
  for f in t.cofactors:
    yield from _term_slots(f)


def channel_arrays(w: Wide) -> Tuple[ChannelArray, ...]:
  """The distinct `ChannelArray`s of a wide value (not those below its
  sources: a contraction over the channel axis has averaged them)."""
  if isinstance(w, ChannelConcat):
    return tuple(a for p in w.parts for a in channel_arrays(p))
  found = {}
  for t in w.terms:
    for k in _term_slots(t):
      if isinstance(k, ChannelArray):
        found.setdefault(id(k), k)
  if isinstance(w.offset, ChannelArray):
    found.setdefault(id(w.offset), w.offset)
  return tuple(found.values())


def channel_dependent(w: Wide) -> bool:
  """Whether a wide value's channels are not identically distributed: it
  holds per-channel arrays, or is a spatial map of such a value."""
  if channel_arrays(w):
    return True
  parts = w.parts if isinstance(w, ChannelConcat) else (w,)
  return any(isinstance(s, MappedSource) and s.per_channel
             for p in parts for t in p.terms for part in t.parts
             for c in (part.combo,) + tuple(part.gargs) + tuple(part.pargs) for s in c.sources)


def at_channel(w: Wide, entries) -> Wide:
  """`w` with every `ChannelArray` `a` replaced by `entries[id(a)]` (a scalar,
  placed in the canonical layout of where it stands): one channel's value."""

  def put(k, rank):
    if not isinstance(k, ChannelArray):
      return k
    return jnp.reshape(entries[id(k)], (1,) * rank)

  def combo(c):
    rank = 1 + len(c.spatial)
    return Combo(c.sources, tuple(put(k, rank) for k in c.coefs), c.spatial, put(c.mean, rank))

  def term(t):
    rank = 1 + len(t.combo.spatial)
    return Term(t.chain, combo(t.combo), tuple(combo(p) for p in t.pargs),
                tuple(put(d, rank) for d in t.dargs), t.factors,
                tuple(term(f) for f in t.cofactors), tuple(combo(g) for g in t.gargs))

  return Wide(w.shape, w.roles, tuple(term(t) for t in w.terms),
              put(w.offset, 1 + len(w.spatial)), w.hidden)


# ----------------------------------------------------------------------------
# Small helpers for floats-or-arrays.


def _is_zero(c) -> bool:
  return isinstance(c, float) and c == 0.0


def _mul(a, b):
  if isinstance(a, float) and isinstance(b, float):
    return a * b
  if _is_zero(a) or _is_zero(b):
    return 0.0
  if isinstance(a, float) and a == 1.0:
    return b
  if isinstance(b, float) and b == 1.0:
    return a
  return a * b


def _add(a, b):
  if _is_zero(a):
    return b
  if _is_zero(b):
    return a
  return a + b


def align(arr, src: Sequence[str], dst: Sequence[str]):
  """Moves a `(B, *src)` array to `(B, *dst)`, adding size-1 axes for roles not in `src`."""
  if isinstance(arr, float):
    return arr
  arr = jnp.asarray(arr)
  missing = [r for r in src if r not in dst]
  if missing:
    # Axes of size one may disappear (a squeeze or reshape); others may not.
    drop = [1 + src.index(r) for r in missing]
    if any(arr.shape[i] != 1 for i in drop):
      raise InternalError(f'spatial axes {missing} dropped without a reduction')
    arr = jnp.squeeze(arr, axis=tuple(drop))
    src = [r for r in src if r not in missing]
  perm = [0] + [1 + src.index(r) for r in dst if r in src]
  arr = jnp.transpose(arr, perm)
  shape = [arr.shape[0]]
  it = iter(arr.shape[1:])
  for r in dst:
    shape.append(next(it) if r in src else 1)
  return arr.reshape(shape)


# ----------------------------------------------------------------------------
# Pair statistics.


@dataclasses.dataclass
class PairStats:
  """Second moments of two values: cross `(N1, N2, *Sa, *Sb)`, same-input blocks."""
  cross: Any
  diag1: Any
  diag2: Any

  def __add__(self, other: 'PairStats') -> 'PairStats':
    return PairStats(_add(self.cross, other.cross), _add(self.diag1, other.diag1),
                     _add(self.diag2, other.diag2))


ZERO = PairStats(0.0, 0.0, 0.0)


class NeedFullSpatial(UnsupportedValueError):
  """Values on different spatial grids paired while only equal positions are
  tracked: the requirements pass (which decides full blocks for spatial
  outputs) did not foresee it."""

  def __init__(self):
    super().__init__('values on different spatial grids are paired while only equal '
                     'spatial positions are tracked; no spatial output asked for full '
                     'blocks')


def batch_diagonal(cross):
  """`(N, N, *S)` → `(N, *S)`: the entries of equal inputs."""
  if isinstance(cross, float):
    return cross
  d = jnp.diagonal(cross, axis1=0, axis2=1)
  return jnp.moveaxis(d, -1, 0)


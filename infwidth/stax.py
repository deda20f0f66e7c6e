"""An NT-compatible layer library whose kernels are derived, not hand-written.

Each layer returns `(init_fn, apply_fn, kernel_fn)` as in `neural_tangents.stax`:

* `init_fn(key, input_shape) -> (output_shape, params)` draws NT's parameters
  (same shapes, same distributions);
* `apply_fn(params, x, **kwargs)` is the finite network, written in plain JAX;
* `kernel_fn(x1, x2=None, get=None, **kwargs)` is `infwidth.kernelize` of
  `apply_fn`. The parameters are `jax.ShapeDtypeStruct`s at the shapes
  `init_fn` would draw for `x1` and their exact moments (`ParamStats`) come
  from `W_std`, `b_std` and the parameterization. No layer has a kernel rule of
  its own.

Parameterizations. Under `parameterization='ntk'` weights and biases are
`N(0, 1)` and scaled in `apply_fn` by `W_std / sqrt(fan_in)` and `b_std`.
Under `'standard'` they are `N(0, W_std^2 / (fan_in / s[0]))` and
`N(0, b_std^2)`, the weights have `s[1] * out_dim` output channels and the
product is scaled by `1 / sqrt(s[0])`, as in NT. NT's standard NTK is the NTK of
exactly this finite network (it grows with the width `out_dim`), so kernelize
reproduces it with unit learning-rate multipliers (`ntk_weights` all 1) at the
widths `init_fn` draws; the NNGP does not depend on the widths.

Differences from Neural Tangents:

* The kernel of a whole `serial` network is kernelize of the composed
  `apply_fn`, traced once, so correlations between branches are exact. NT
  treats the inputs of `FanInSum` as independent: for
  `serial(FanOut(2), parallel(Identity(), Identity()), FanInSum())` NT gives
  `2K` while the network computes `x + x`, whose kernel is `4K` (returned
  here). Branches that pass through fresh centred weights (residual blocks)
  are uncorrelated and agree with NT.
* `Elementwise(fn, nngp_fn, d_nngp_fn)` and `ElementwiseNumerical(fn, deg)`
  derive the kernel from `fn` itself (closed forms where recognised,
  infwidth's Gauss-Hermite quadrature otherwise); `nngp_fn`, `d_nngp_fn`,
  `deg` and `df` are accepted for compatibility and unused.
* `Hermite(n)` gets `E[He_n(u) He_n(v)] / n!` at the actual variances; NT's
  kernel `ρ^n` assumes unit-variance inputs (the two agree there).
* `ExpNormalized` has a finite network (NT's `apply_fn` raises), described in
  its docstring, whose kernel is NT's.
* `Gelu(approximate=True)` gets the kernel of the tanh approximation itself;
  NT returns the exact-GELU kernel for both settings (they differ by ~1e-4).
* `kernel_fn` accepts arrays or an `infwidth.Kernel` (without spatial axes) in
  place of `x1`; masking and a list of inputs (a network that starts with
  `parallel`) are not supported. `diagonal_spatial=True` and
  `diagonal_batch=False` give NT's shapes, computed from the full kernel (also
  where NT raises because a pooling needs the full spatial covariance).
  `Kernel.is_reversed` is always `False` (NT reverses spatial axes internally
  after some layers; infwidth's arrays are always in order).
* `ImageResize` to a non-square size ('nearest' or 'linear'): NT resizes its
  kernel in its internal reversed spatial order (H gets W's size); infwidth's
  kernel is the finite network's (checked by Monte Carlo).
* `Dropout(rate, 'train')` gets NT's kernel where NT has one; a nonlinearity
  right after it (which NT refuses: its input is not Gaussian) gets the exact
  mixture over the mask. `kernel_fn(x1, x2)` with an `x2` equal to `x1` in
  value but a different array counts as two batches (independent masks); NT
  compares values. `serial` and `parallel` split `rng` per layer, as NT's do.
* Layers whose finite network uses an operation kernelize cannot interpret
  make `kernel_fn` raise `infwidth.InfwidthError` naming the operation; no
  approximate kernel is substituted. Currently: a `FanInConcat` along the
  channel axis whose output meets a value not concatenated the same way (a
  residual sum with one branch).
"""

from __future__ import annotations

import functools
import inspect
import math
import string
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from infwidth import kernel_layout
from infwidth.errors import InfwidthError, UnsupportedPrimitiveError
from infwidth.domain.kernel import build_kernel, interleave
from infwidth.kernel import Kernel
from infwidth.kernelize import ParamStats, _check_get, kernelize

__all__ = [
    'Layer', 'serial', 'parallel', 'FanOut', 'FanInSum', 'FanInConcat', 'Identity',
    'Dense', 'Conv', 'ConvTranspose', 'AvgPool', 'SumPool', 'MaxPool', 'GlobalAvgPool',
    'GlobalSumPool', 'Flatten', 'LayerNorm', 'Relu', 'LeakyRelu', 'ABRelu', 'Abs',
    'Sign', 'Erf', 'Gelu', 'Sin', 'Cos', 'Exp', 'Gaussian', 'Rbf', 'Sigmoid_like',
    'Elementwise', 'ElementwiseNumerical', 'Monomial', 'RectifiedMonomial', 'Polynomial',
    'Hermite', 'Gabor', 'ExpNormalized', 'FanInProd', 'DotGeneral', 'Index', 'Slice', 'repeat',
    'ImageResize', 'Dropout', 'unmask_fn',
]

Shape = Tuple[int, ...]
StatsFn = Callable[[Any], Any]
_PADDINGS = ('VALID', 'SAME', 'CIRCULAR')


class Layer(tuple):
  """`(init_fn, apply_fn, kernel_fn)`; also carries `stats_fn(params) -> param_stats`
  and `uses_rng` (its `apply_fn` needs `rng=key`: dropout in training mode)."""

  stats_fn: StatsFn
  uses_rng: bool

  def __new__(cls, init_fn: Callable, apply_fn: Callable, stats_fn: StatsFn,
              uses_rng: bool = False):
    self = super().__new__(cls, (init_fn, apply_fn,
                                 _kernel_fn(init_fn, apply_fn, stats_fn, uses_rng)))
    self.stats_fn = stats_fn
    self.uses_rng = uses_rng
    return self

  @property
  def init_fn(self) -> Callable:
    return self[0]

  @property
  def apply_fn(self) -> Callable:
    return self[1]

  @property
  def kernel_fn(self) -> Callable:
    return self[2]


def _stats_of(layer) -> StatsFn:
  if isinstance(layer, Layer):
    return layer.stats_fn
  raise InfwidthError(
      'infwidth.stax combinators need infwidth.stax layers (they know their '
      f'parameter distributions); got {type(layer).__name__}. Wrap a custom '
      '(init_fn, apply_fn) pair with infwidth.kernelize directly.')


def _input_shape(x1) -> Tuple[Shape, Any]:
  if isinstance(x1, Kernel):
    if not x1.shape1:
      raise InfwidthError('a Kernel in place of x1 needs shape1 (the shape of the '
                          'previous layer output).')
    return (int(jnp.shape(x1.nngp)[0]),) + tuple(x1.shape1[1:]), jnp.result_type(x1.nngp)
  if isinstance(x1, (tuple, list)):   # several inputs (a network starting with `parallel`)
    shapes_dtypes = [_input_shape(x) for x in x1]
    floats = [d for _, d in shapes_dtypes]
    return type(x1)(s for s, _ in shapes_dtypes), jnp.result_type(*floats)
  if not hasattr(x1, 'shape'):
    raise InfwidthError(f'x1 must be an array, a tuple or list of arrays, or an '
                        f'infwidth.Kernel; got {type(x1).__name__}.')
  dtype = x1.dtype if jnp.issubdtype(x1.dtype, jnp.floating) else jnp.float32
  return tuple(x1.shape), dtype


def _parameter_free_kernel(apply_fn, params, x1, x2, **kwargs) -> Kernel:
  """The kernel of a network without parameters (pooling, flattening, reshaping
  the inputs), NT's kernel of its inputs: `Σ_c f(x)_c f(x′)_c / C` over the
  channel (last) axis at every pair of positions, and a zero NTK."""
  f1 = apply_fn(params, x1, **kwargs)
  f2 = f1 if x2 is None or x2 is x1 else apply_fn(params, x2, **kwargs)
  k = f1.ndim - 2
  a, b = string.ascii_lowercase[:k], string.ascii_lowercase[k:2 * k]
  c = f1.shape[-1]
  gram = lambda u, v, lead: jnp.einsum(f'x{a}z,{lead}{b}z->{"x" if lead == "x" else "xy"}{a}{b}',
                                       u, v) / c
  spatial = tuple(f1.shape[1:-1])
  x1_is_x2 = f2 is f1
  dtype = jnp.result_type(f1)
  return build_kernel(interleave(gram(f1, f2, 'y'), (f1.shape[0], f2.shape[0]), spatial, dtype),
                      0.0, interleave(gram(f1, f1, 'x'), (f1.shape[0],), spatial, dtype),
                      None if x1_is_x2 else interleave(gram(f2, f2, 'x'), (f2.shape[0],),
                                                       spatial, dtype),
                      shape1=f1.shape, shape2=f2.shape, x1_is_x2=x1_is_x2,
                      spatial_shape=spatial, dtype=dtype)


def _param_shapes(init_fn: Callable, input_shape: Shape) -> Any:
  """`init_fn(key, input_shape)` as shapes. The key is made inside
  `eval_shape`, so that under an outer trace (`jax.jit`, `make_jaxpr`) no
  operation is staged: the traced kernel function is the same whether or not
  the parameter shapes were looked up before."""
  return jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0), input_shape))


def _uses_rng(layers) -> bool:
  return any(getattr(l, 'uses_rng', False) for l in layers)


def _split_rng(kwargs, n: int):
  """`n` keyword dicts with `rng` split into one key per layer (`None`s
  without one), as NT's (and `jax.example_libraries.stax`'s) combinators do."""
  rng = kwargs.get('rng')
  rest = {k: v for k, v in kwargs.items() if k != 'rng'}
  rngs = jax.random.split(rng, n) if rng is not None else (None,) * n
  return [dict(rest, rng=r) for r in rngs]


def _kernel_fn(init_fn: Callable, apply_fn: Callable, stats_fn: StatsFn,
               uses_rng: bool = False) -> Callable:
  """kernelize of `apply_fn` at the parameter shapes `init_fn` draws for `x1`.

  With `uses_rng` (dropout in training mode) and no `rng` given, a fixed key
  is passed: the kernel does not depend on the key, only on the masks being
  random."""

  @functools.lru_cache(maxsize=32)
  def build(input_shape: Shape, dtype) -> Callable:
    _, shapes = _param_shapes(init_fn, input_shape)
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
    return kernelize(apply_fn, params, param_stats=stats_fn(params))

  def full_fn(x1, x2, get, **kwargs):
    if isinstance(x1, Kernel):
      x1 = kernel_layout.input_kernel(x1)
    if uses_rng and kwargs.get('rng') is None:
      kwargs = dict(kwargs, rng=jax.random.PRNGKey(0))
    input_shape, dtype = _input_shape(x1)
    if not isinstance(x1, Kernel):
      _, shapes = _param_shapes(init_fn, input_shape)
      if not any(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)):
        if uses_rng:
          raise InfwidthError('Dropout cannot be applied to the input layer: a network '
                              'without parameters has no wide axis to average its masks '
                              'over.')
        # No parameter (or only empty ones: `repeat(layer, 0)`): NT's kernel of the inputs.
        empty = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        k = _parameter_free_kernel(apply_fn, empty, x1, x2, **kwargs)
        return k if get is None else k.get(get) if isinstance(get, str) else k.get(tuple(get))
    try:
      return build(input_shape, jnp.dtype(dtype))(x1, x2, get, **kwargs)
    except UnsupportedPrimitiveError as e:
      raise InfwidthError(
          f'infwidth.stax: kernelize has no infinite-width rule for `{e.primitive}`, '
          'which this network\'s apply_fn uses, so its kernel is not available '
          '(no approximation is substituted).\n' + str(e)) from e

  def kernel_fn(x1, x2=None, get=None, *, diagonal_batch: Optional[bool] = None,
                diagonal_spatial: Optional[bool] = None,
                mask_constant: Optional[float] = None, **kwargs):
    """NNGP/NTK of the infinite-width network: `(N1, N2)` per output channel,
    `(N1, N2, H, H', W, W')` for spatial outputs (`(N1, N2, H, W)` with
    `diagonal_spatial=True`), a namedtuple for a tuple `get`, or a `Kernel`
    for `get=None`. `diagonal_batch=False` gives `(N1, N1, ...)` `cov1`
    (and `(N2, N2, ...)` `cov2`), as in NT."""
    if mask_constant is not None:
      raise InfwidthError('infwidth.stax does not support masking (mask_constant); '
                          'remove masked entries from the inputs instead.')
    gets = _check_get(get)
    if not diagonal_spatial and diagonal_batch is not False:
      return full_fn(x1, x2, get, **kwargs)
    k = kernel_layout.with_layout(full_fn, x1, x2, diagonal_batch, diagonal_spatial, **kwargs)
    if gets is None:
      return k
    pick = lambda kk: kk.get(gets[0]) if isinstance(get, str) else kk.get(gets)
    return jax.tree_util.tree_map(pick, k, is_leaf=lambda v: isinstance(v, Kernel))

  return kernel_fn


# Combinators.


def serial(*layers) -> Layer:
  """Layers applied one after another (NT's `stax.serial`)."""
  init_fns, apply_fns = [l[0] for l in layers], [l[1] for l in layers]
  stats_fns = [_stats_of(l) for l in layers]

  def init_fn(key, input_shape):
    params = []
    for f in init_fns:
      key, sub = jax.random.split(key)
      input_shape, p = f(sub, input_shape)
      params.append(p)
    return input_shape, params

  def apply_fn(params, x, **kwargs):
    for f, p, kw in zip(apply_fns, params, _split_rng(kwargs, len(layers))):
      x = f(p, x, **kw)
    return x

  def stats_fn(params):
    return [s(p) for s, p in zip(stats_fns, params)]

  return Layer(init_fn, apply_fn, stats_fn, _uses_rng(layers))


def repeat(layer, n: int) -> Layer:
  """`layer` composed `n` times in a loop (NT's `stax.repeat`): equivalent to
  `serial(*[layer] * n)`, with independent parameters for each repetition
  stacked along a leading axis of size `n` (drawn as NT draws them, so the
  same key gives NT's parameters), and `apply_fn` a `lax.scan` over them.
  Its output shape must equal its input shape. The kernel is derived through
  kernelize of that scan."""
  if not isinstance(n, int) or n < 0:
    raise ValueError(f'repeat needs a non-negative integer count, got {n!r}.')
  init_one, apply_one = layer[0], layer[1]
  stats_one = _stats_of(layer)

  def init_fn(key, input_shape):
    box = []
    jax.eval_shape(lambda k: box.append(init_one(k, input_shape)[0]), key)
    output_shape = box[0]
    if tuple(output_shape) != tuple(input_shape):
      raise ValueError(f'repeat: the layer maps shape {tuple(input_shape)} to '
                       f'{tuple(output_shape)}; its output shape must equal its input shape '
                       '(use serial(*[layer] * n) otherwise).')

    def one(key, _):
      key, layer_key = jax.random.split(key)
      return key, init_one(layer_key, input_shape)[1]

    return input_shape, jax.lax.scan(one, key, None, n)[1]

  def apply_fn(params, x, **kwargs):
    return jax.lax.scan(lambda x, p: (apply_one(p, x, **kwargs), None), x, params, n)[0]

  def stats_fn(params):
    # One repetition's moments hold for every slice of the stacked leaves.
    one = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(np.shape(l)[1:], l.dtype),
                                 params)
    return stats_one(one)

  return Layer(init_fn, apply_fn, stats_fn, _uses_rng([layer]))


def parallel(*layers) -> Layer:
  """Layer i applied to input i of a list (NT's `stax.parallel`)."""
  init_fns, apply_fns = [l[0] for l in layers], [l[1] for l in layers]
  stats_fns = [_stats_of(l) for l in layers]

  def init_fn(key, input_shape):
    keys = jax.random.split(key, len(layers))
    outs = [f(k, s) for f, k, s in zip(init_fns, keys, input_shape)]
    return type(input_shape)(o[0] for o in outs), [o[1] for o in outs]

  def apply_fn(params, xs, **kwargs):
    kws = _split_rng(kwargs, len(layers))
    return type(xs)(f(p, x, **kw) for f, p, x, kw in zip(apply_fns, params, xs, kws))

  def stats_fn(params):
    return [s(p) for s, p in zip(stats_fns, params)]

  return Layer(init_fn, apply_fn, stats_fn, _uses_rng(layers))


def _no_params(fn: Callable, shape_fn: Callable) -> Layer:
  return Layer(lambda key, s: (shape_fn(s), ()), lambda p, x, **kw: fn(x), lambda p: ())


def Identity() -> Layer:
  """The identity."""
  return _no_params(lambda x: x, lambda s: s)


def FanOut(num: int) -> Layer:
  """`num` copies of the input (a list)."""
  return _no_params(lambda x: [x] * num, lambda s: [s] * num)


def FanInSum() -> Layer:
  """The sum of a list of inputs."""
  return _no_params(lambda xs: functools.reduce(lambda a, b: a + b, xs), lambda s: s[0])


def FanInProd() -> Layer:
  """The elementwise product of a list of inputs. For independent inputs
  (branches with their own weights) the kernel is the product of theirs, as
  in NT; where the inputs are correlated (`FanOut` then the same value twice)
  it is the true one, where NT multiplies their kernels as if independent."""
  return _no_params(lambda xs: functools.reduce(lambda a, b: a * b, xs), lambda s: s[0])


def FanInConcat(axis: int = -1) -> Layer:
  """Concatenation of a list of inputs along `axis`. Along the channel axis
  each block of channels keeps its input's kernel; a following `Dense` or
  `Conv` sees their average weighted by channel counts (NT's convention for
  the output of the concatenation itself)."""

  def shape_fn(shapes):
    a = axis % len(shapes[0])
    return tuple(shapes[0][:a]) + (sum(s[a] for s in shapes),) + tuple(shapes[0][a + 1:])

  def fn(xs):
    return jnp.concatenate(xs, axis)

  return _no_params(fn, shape_fn)


# Dense and convolutions.


def _channel_bias(b, ndim: int, channel_axis: int):
  """NT's bias `(1, …, C, …, 1)` (or a scalar, as NT accepts) as an array of
  the output's rank with its entries along `channel_axis`, so that it
  broadcasts without rank promotion."""
  v = jnp.reshape(jnp.asarray(b), -1)
  shape = [1] * ndim
  shape[channel_axis % ndim] = v.shape[0]
  return v.reshape(shape)


def _check_parameterization(parameterization: str) -> str:
  p = parameterization.lower()
  if p not in ('ntk', 'standard'):
    raise ValueError(f'Parameterization not supported: {parameterization}')
  return p


def Dense(out_dim: int, W_std: float = 1., b_std: Optional[float] = None,
          batch_axis: int = 0, channel_axis: int = -1, parameterization: str = 'ntk',
          s: Tuple[int, int] = (1, 1)) -> Layer:
  """Fully connected layer on `channel_axis`: `W` is `(C_in, out_dim)` (`s[1] * out_dim`
  under standard parameterization), `b` broadcasts along the other axes."""
  parameterization = _check_parameterization(parameterization)
  width = out_dim if parameterization == 'ntk' else out_dim * s[1]

  def init_fn(key, input_shape):
    ca = channel_axis % len(input_shape)
    output_shape = tuple(input_shape[:ca]) + (width,) + tuple(input_shape[ca + 1:])
    k1, k2 = jax.random.split(key)
    W = jax.random.normal(k1, (input_shape[ca], width))
    b = None
    if b_std is not None:
      b_shape = [1] * len(input_shape)
      b_shape[ca] = width
      b = jax.random.normal(k2, b_shape)
    if parameterization == 'standard':
      W = W * (W_std / (input_shape[ca] / s[0])**0.5)
      b = None if b is None else b * b_std
    return output_shape, (W, b)

  def apply_fn(params, x, **kwargs):
    W, b = params
    ca = channel_axis % x.ndim
    prod = jnp.moveaxis(jnp.tensordot(x, W, (ca, 0)), -1, ca)
    if parameterization == 'ntk':
      out = (W_std / x.shape[ca]**0.5) * prod
      return out if b is None else out + b_std * _channel_bias(b, x.ndim, ca)
    out = prod / s[0]**0.5
    return out if b is None else out + _channel_bias(b, x.ndim, ca)

  def stats_fn(params):
    W, b = params
    if parameterization == 'ntk':
      return ParamStats(0., 1.), None if b is None else ParamStats(0., 1.)
    w_var = W_std**2 / (W.shape[0] / s[0])
    return ParamStats(0., w_var), None if b is None else ParamStats(0., b_std**2)

  return Layer(init_fn, apply_fn, stats_fn)


def _dimension_numbers(n: int) -> Tuple[str, str, str]:
  """NT's default: channels last, `('NAB…C', 'AB…IO', 'NAB…C')`."""
  spatial = ''.join(c for c in string.ascii_uppercase if c not in 'NCIO')[:n]
  lhs = 'N' + spatial + 'C'
  return lhs, spatial + 'IO', lhs


def _check_padding(padding: str) -> str:
  p = padding.upper()
  if p not in _PADDINGS:
    raise ValueError(f'padding={padding!r}: must be one of {_PADDINGS}.')
  return p


def _same_pad_circular(x, filter_shape, strides, spatial_axes):
  """Wrap-around padding that makes a VALID convolution the periodic SAME one (NT)."""
  sizes = tuple(x.shape[a] for a in spatial_axes)
  axis_pads = lax.padtype_to_pads(sizes, tuple(filter_shape), tuple(strides), 'SAME')
  pads = [(0, 0)] * x.ndim
  for a, p in zip(spatial_axes, axis_pads):
    pads[a] = tuple(p)
  return jnp.pad(x, pads, mode='wrap')


def _circular_crop_transpose(x, spatial_axes, out_shape):
  """NT's periodic SAME transpose convolution: crops the VALID output to the SAME
  shape, each entry summing all entries that wrap onto it."""
  window = tuple(int(np.ceil(x.shape[i] / out_shape[i])) // 2 * 2 + 1 if i in spatial_axes
                 else 1 for i in range(x.ndim))
  dilation = tuple(out_shape[i] if i in spatial_axes else 1 for i in range(x.ndim))
  x = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, window, (1,) * x.ndim, 'SAME',
                        window_dilation=dilation)
  idx = []
  for i in range(x.ndim):
    lo = (x.shape[i] - out_shape[i]) // 2
    idx.append(slice(lo, lo + out_shape[i]) if i in spatial_axes else slice(None))
  return x[tuple(idx)]


def _conv_layer(out_chan: int, filter_shape: Sequence[int], strides, padding: str,
                W_std: float, b_std: Optional[float], dimension_numbers,
                parameterization: str, s: Tuple[int, int], transpose: bool) -> Layer:
  parameterization = _check_parameterization(parameterization)
  padding = _check_padding(padding)
  filter_shape = tuple(filter_shape)
  n = len(filter_shape)
  if dimension_numbers is None:
    dimension_numbers = _dimension_numbers(n)
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  strides = tuple(strides or (1,) * n)
  width = out_chan if parameterization == 'ntk' else out_chan * s[1]
  init_padding = 'SAME' if padding == 'CIRCULAR' else padding
  apply_padding = 'VALID' if padding == 'CIRCULAR' else padding

  def conv(x, W, pad):
    if transpose:
      return lax.conv_transpose(x, W, strides, pad, dimension_numbers=dimension_numbers)
    return lax.conv_general_dilated(x, W, strides, pad, dimension_numbers=dimension_numbers)

  def fan_in(input_shape):
    return input_shape[lhs_spec.index('C')] * int(np.prod(filter_shape))

  def init_fn(key, input_shape):
    filt = iter(filter_shape)
    w_shape = tuple(width if c == 'O' else input_shape[lhs_spec.index('C')] if c == 'I'
                    else next(filt) for c in rhs_spec)
    shape_in = tuple(1 if d in (-1, None) else d for d in input_shape)
    out = jax.eval_shape(lambda x, w: conv(x, w, init_padding),
                         jax.ShapeDtypeStruct(shape_in, jnp.float32),
                         jax.ShapeDtypeStruct(w_shape, jnp.float32)).shape
    output_shape = tuple(input_shape[lhs_spec.index('N')] if c == 'N' else out[out_spec.index(c)]
                         for c in out_spec)
    k1, k2 = jax.random.split(key)
    W = jax.random.normal(k1, w_shape)
    b = None
    if b_std is not None:
      b = jax.random.normal(k2, tuple(width if c == 'C' else 1 for c in out_spec))
    if parameterization == 'standard':
      W = W * (W_std / (fan_in(input_shape) / s[0])**0.5)
      b = None if b is None else b * b_std
    return output_shape, (W, b)

  def apply_fn(params, x, **kwargs):
    W, b = params
    if parameterization == 'ntk':
      norm, b_scale = W_std / fan_in(x.shape)**0.5, b_std
    else:
      norm, b_scale = 1. / s[0]**0.5, 1.
    if padding == 'CIRCULAR' and not transpose:
      spatial = tuple(lhs_spec.index(c) for c in rhs_spec if c not in 'IO')
      x = _same_pad_circular(x, filter_shape, strides, spatial)
    out = norm * conv(x, W, apply_padding)
    if padding == 'CIRCULAR' and transpose:
      same_shape = jax.eval_shape(lambda x, w: conv(x, w, 'SAME'), x, W).shape
      spatial = tuple(out_spec.index(c) for c in rhs_spec if c not in 'IO')
      out = _circular_crop_transpose(out, spatial, same_shape)
    return out if b is None else out + b_scale * _channel_bias(b, out.ndim, out_spec.index('C'))

  def stats_fn(params):
    W, b = params
    if parameterization == 'ntk':
      return ParamStats(0., 1.), None if b is None else ParamStats(0., 1.)
    fan = W.size // W.shape[rhs_spec.index('O')]
    return (ParamStats(0., W_std**2 / (fan / s[0])),
            None if b is None else ParamStats(0., b_std**2))

  return Layer(init_fn, apply_fn, stats_fn)


def Conv(out_chan: int, filter_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
         padding: str = 'VALID', W_std: float = 1.0, b_std: Optional[float] = None,
         dimension_numbers: Optional[Tuple[str, str, str]] = None,
         parameterization: str = 'ntk', s: Tuple[int, int] = (1, 1)) -> Layer:
  """Convolution (1-, 2- or 3-D; NHWC/HWIO by default); padding 'VALID', 'SAME' or
  'CIRCULAR' (periodic)."""
  return _conv_layer(out_chan, filter_shape, strides, padding, W_std, b_std,
                     dimension_numbers, parameterization, s, transpose=False)


def ConvTranspose(out_chan: int, filter_shape: Sequence[int],
                  strides: Optional[Sequence[int]] = None, padding: str = 'VALID',
                  W_std: float = 1.0, b_std: Optional[float] = None,
                  dimension_numbers: Optional[Tuple[str, str, str]] = None,
                  parameterization: str = 'ntk', s: Tuple[int, int] = (1, 1)) -> Layer:
  """Transpose convolution (`lax.conv_transpose`), arguments as for `Conv`."""
  return _conv_layer(out_chan, filter_shape, strides, padding, W_std, b_std,
                     dimension_numbers, parameterization, s, transpose=True)


def DotGeneral(*, lhs=None, rhs=None,
               dimension_numbers=(((), ()), ((), ())), precision=None,
               batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """`lax.dot_general(x, rhs, ...)` or `lax.dot_general(lhs, x, ...)` with a
  constant (non-trainable) `lhs` or `rhs`; the identity if both are None.
  The channel axis must not be contracted."""
  if rhs is not None and lhs is not None:
    raise ValueError('At most one of constant `rhs` and `lhs` can be non-`None`, since '
                     'the other factor is considered to be the layer `inputs`.')
  if rhs is None and lhs is None:
    return Identity()
  is_lhs = rhs is None
  other = np.asarray(lhs if is_lhs else rhs)

  def fn(x):
    return _dot_general_const(x, jnp.asarray(other, x.dtype), dimension_numbers, is_lhs,
                              batch_axis, channel_axis)

  def shape_fn(input_shape):
    return jax.eval_shape(fn, jax.ShapeDtypeStruct(input_shape, jnp.float32)).shape

  return _no_params(fn, shape_fn)


def _dot_general_const(x, other, dimension_numbers, x_is_rhs: bool, batch_axis: int = 0,
                       channel_axis: int = -1):
  """`lax.dot_general` of `x` with a constant `other`, written as products with
  constants, sums over the contracted axes and a concatenation over the free
  axes of `other` (the same values; kernelize interprets these, not a
  `dot_general` without a parameter operand, nor copies of a wide value along
  a new axis)."""
  (lc, rc), (lb, rb) = dimension_numbers
  (xc, oc), (xb, ob) = ((rc, lc), (rb, lb)) if x_is_rhs else ((lc, rc), (lb, rb))
  xc, oc, xb, ob = (tuple(a % n for a in ax) for ax, n in
                    ((xc, x.ndim), (oc, other.ndim), (xb, x.ndim), (ob, other.ndim)))
  x_free = tuple(i for i in range(x.ndim) if i not in xc + xb)
  o_free = tuple(i for i in range(other.ndim) if i not in oc + ob)
  nb, nx, no = len(xb), len(x_free), len(o_free)
  if no and not xb and len(xc) == 1:
    # A constant matrix along one axis: kernelize maps that axis (`K ↦ M K Mᵀ`).
    if x_is_rhs:
      return lax.dot_general(other, x, ((oc, xc), ((), ())))
    return lax.dot_general(x, other, ((xc, oc), ((), ())))
  # x as (batch, x_free, contracted); other as (batch, o_free, contracted).
  xt = jnp.transpose(x, xb + x_free + xc)
  ot = jnp.transpose(other, ob + o_free + oc)
  o_shape = ot.shape[nb:nb + no]
  ot = ot.reshape(ot.shape[:nb] + (-1,) + ot.shape[nb + no:])
  pieces = []
  for j in range(ot.shape[nb]):
    oj = ot[(slice(None),) * nb + (j,)]
    oj = oj.reshape(oj.shape[:nb] + (1,) * nx + oj.shape[nb:])
    piece = xt * oj
    if xc:
      piece = piece.sum(tuple(range(nb + nx, piece.ndim)))
    pieces.append(piece)
  if no:
    # Stacked along a spatial axis of x that stays (kernelize concatenates
    # wide values along spatial axes), then split off as other's free axes.
    keep = [k for k, i in enumerate(xb + x_free) if i not in (batch_axis % x.ndim,
                                                               channel_axis % x.ndim)]
    a = keep[0] if keep else len(pieces[0].shape)
    if not keep:
      pieces = [pc[..., None] for pc in pieces]
    out = jnp.concatenate(pieces, a)
    out = out.reshape(out.shape[:a] + (len(pieces), -1) + out.shape[a + 1:])
    out = jnp.moveaxis(out, a, -1)
    if not keep:
      out = out[..., 0, :]
    out = out.reshape(out.shape[:nb + nx] + o_shape)
  else:
    out = pieces[0]
  if x_is_rhs:  # dot_general's order: batch, lhs free (other), rhs free (x).
    out = jnp.transpose(out, tuple(range(nb)) + tuple(range(nb + nx, nb + nx + no)) +
                        tuple(range(nb, nb + nx)))
  return out


def ImageResize(shape: Sequence[int], method, antialias: bool = True,
                precision=lax.Precision.HIGHEST, batch_axis: int = 0,
                channel_axis: int = -1) -> Layer:
  """`jax.image.resize` to `shape` (`-1` keeps an axis; the channel axis must be
  kept). 'nearest' is written as slices and a concatenation (the same values);
  the other methods multiply each axis by a constant weight matrix. kernelize
  interprets both as maps of the spatial axes."""
  nearest = str(getattr(method, 'name', method)).lower() == 'nearest'

  def out_shape(input_shape):
    return tuple(d if s == -1 else s for s, d in zip(shape, input_shape))

  def fn(x):
    new_shape = out_shape(x.shape)
    if not nearest:
      return jax.image.resize(x, new_shape, method, antialias, precision)
    for axis, (n_in, n_out) in enumerate(zip(x.shape, new_shape)):
      if n_in != n_out:
        x = _take_nearest(x, axis, n_out)
    return x

  return _no_params(fn, out_shape)


def _take_nearest(x, axis: int, n_out: int):
  """`jax.image.resize(..., 'nearest')` along one axis: output position `j`
  copies input `floor((j + 1/2) n_in / n_out)`, as runs of slices."""
  n_in = x.shape[axis]
  src = np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)
  pieces, start = [], 0
  for j in range(1, n_out + 1):
    if j == n_out or src[j] != src[j - 1] + 1:  # a run of consecutive sources ends
      pieces.append(lax.slice_in_dim(x, int(src[start]), int(src[j - 1]) + 1, axis=axis))
      start = j
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis)


def Index(idx, batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """`x[idx]`, NumPy indexing; build `idx` with `stax.Slice[...]`
  (`Slice[:, 1:4, ::-1]`). The channel axis must be kept whole (`:` or `...`)."""

  def fn(x):
    return x[idx]

  def shape_fn(input_shape):
    return jax.eval_shape(fn, jax.ShapeDtypeStruct(input_shape, jnp.float32)).shape

  return _no_params(fn, shape_fn)


def unmask_fn(fn: Callable) -> Callable:
  """NT's `unmask_fn`: `apply_fn` returning plain arrays. infwidth's layers
  never return masked arrays (masking is not supported), so this is `fn`,
  refusing a `mask_constant` other than `None`."""

  @functools.wraps(fn)
  def apply_fn(params, x, *, mask_constant=None, **kwargs):
    if mask_constant is not None:
      raise InfwidthError('infwidth.stax does not support masking (mask_constant); '
                          'remove masked entries from the inputs instead.')
    return fn(params, x, **kwargs)

  return apply_fn


class _Slice:
  """`Slice[1:10, :, ::-1]` is the index `(slice(1, 10), slice(None), slice(None, None, -1))`."""

  def __getitem__(self, idx):
    return idx


Slice = _Slice()


# Pooling, flattening, normalisation.


def _pool_dims(ndim: int, window_shape, strides, batch_axis, channel_axis):
  non_spatial = sorted((batch_axis % ndim, channel_axis % ndim))
  dims, strd = list(window_shape), list(strides)
  for a in non_spatial:
    dims.insert(a, 1)
    strd.insert(a, 1)
  return tuple(dims), tuple(strd), non_spatial


def _pool(average: bool, window_shape, strides, padding, normalize_edges, batch_axis,
          channel_axis) -> Layer:
  window_shape = tuple(window_shape)
  strides = tuple(strides or (1,) * len(window_shape))
  padding = _check_padding(padding)

  def init_fn(key, input_shape):
    dims, strd, _ = _pool_dims(len(input_shape), window_shape, strides, batch_axis,
                               channel_axis)
    pad = 'SAME' if padding == 'CIRCULAR' else padding
    pads = lax.padtype_to_pads(input_shape, dims, strd, pad)
    ones = (1,) * len(dims)
    return lax.reduce_window_shape_tuple(input_shape, dims, strd, pads, ones, ones), ()

  def apply_fn(params, x, **kwargs):
    dims, strd, non_spatial = _pool_dims(x.ndim, window_shape, strides, batch_axis,
                                         channel_axis)
    pad = padding
    if padding == 'CIRCULAR':
      spatial = tuple(i for i in range(x.ndim) if i not in non_spatial)
      x = _same_pad_circular(x, window_shape, strides, spatial)
      pad = 'VALID'
    out = lax.reduce_window(x, 0., lax.add, dims, strd, pad)
    if not average:
      return out
    if normalize_edges and pad == 'SAME':
      # Unpadded entries per window: a constant over batch and channels.
      ones = tuple(1 if i in non_spatial else d for i, d in enumerate(x.shape))
      counts = lax.reduce_window(np.ones(ones, np.float64), 0., lax.add, dims, strd, pad)
      return out / jnp.asarray(counts, out.dtype)
    return out / np.prod(window_shape)

  return Layer(init_fn, apply_fn, lambda p: ())


def AvgPool(window_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
            padding: str = 'VALID', normalize_edges: bool = False, batch_axis: int = 0,
            channel_axis: int = -1) -> Layer:
  """Average pooling; `normalize_edges=True` divides by the number of unpadded entries."""
  return _pool(True, window_shape, strides, padding, normalize_edges, batch_axis,
               channel_axis)


def SumPool(window_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
            padding: str = 'VALID', batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Sum pooling."""
  return _pool(False, window_shape, strides, padding, False, batch_axis, channel_axis)


def MaxPool(window_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
            padding: str = 'VALID', batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Max pooling, padded with −∞ (`lax.reduce_window` with `lax.max`): an edge
  window of `'SAME'` holds fewer entries. Its kernel is integrated by the
  quasi-Monte Carlo rule (docs/semantics.md, "Max pooling"); NT has none."""
  window_shape = tuple(window_shape)
  strides = tuple(strides or (1,) * len(window_shape))
  padding = _check_padding(padding)
  if padding == 'CIRCULAR':
    raise ValueError('MaxPool supports padding "VALID" and "SAME"')

  def init_fn(key, input_shape):
    dims, strd, _ = _pool_dims(len(input_shape), window_shape, strides, batch_axis,
                               channel_axis)
    pads = lax.padtype_to_pads(input_shape, dims, strd, padding)
    ones = (1,) * len(dims)
    return lax.reduce_window_shape_tuple(input_shape, dims, strd, pads, ones, ones), ()

  def apply_fn(params, x, **kwargs):
    dims, strd, _ = _pool_dims(x.ndim, window_shape, strides, batch_axis, channel_axis)
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, strd, padding)

  return Layer(init_fn, apply_fn, lambda p: ())


def _global_pool(average: bool, batch_axis: int, channel_axis: int) -> Layer:
  def spatial(ndim):
    keep = (batch_axis % ndim, channel_axis % ndim)
    return tuple(i for i in range(ndim) if i not in keep)

  def init_fn(key, input_shape):
    sp = spatial(len(input_shape))
    return tuple(d for i, d in enumerate(input_shape) if i not in sp), ()

  def apply_fn(params, x, **kwargs):
    return x.mean(spatial(x.ndim)) if average else x.sum(spatial(x.ndim))

  return Layer(init_fn, apply_fn, lambda p: ())


def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Mean over all spatial axes."""
  return _global_pool(True, batch_axis, channel_axis)


def GlobalSumPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Sum over all spatial axes."""
  return _global_pool(False, batch_axis, channel_axis)


def Flatten(batch_axis: int = 0, batch_axis_out: int = 0) -> Layer:
  """All non-batch axes flattened into one: `(N, H, W, C) -> (N, HWC)` (or `(HWC, N)`
  with `batch_axis_out=1`)."""
  if batch_axis_out not in (0, 1, -1, -2):
    raise ValueError(f'`batch_axis_out` must be 0 or 1, got {batch_axis_out}.')
  batch_out = 0 if batch_axis_out in (0, -2) else 1

  def out_shape(shape):
    ba = batch_axis % len(shape)
    rest = int(np.prod([d for i, d in enumerate(shape) if i != ba]))
    return (shape[ba], rest) if batch_out == 0 else (rest, shape[ba])

  def apply_fn(params, x, **kwargs):
    shape = out_shape(x.shape)
    return jnp.moveaxis(x, batch_axis, -batch_out).reshape(shape)

  return Layer(lambda key, s: (out_shape(s), ()), apply_fn, lambda p: ())


def Dropout(rate: float, mode: str = 'train') -> Layer:
  """NT's (and `jax.example_libraries.stax`'s) dropout: `rate` is the
  probability of KEEPING a unit; in `'train'` mode `apply_fn(params, x,
  rng=key)` returns `where(bernoulli(key, rate), x / rate, 0)`, in `'test'`
  mode `x`. Its kernel is derived from that masked network (the same-input
  moments, `cov1`/`cov2` and the diagonal of `x1 is x2`, scaled by
  `1 / rate`; docs/semantics.md, "Dropout"); `kernel_fn` needs no key."""
  if mode not in ('test', 'train'):
    raise ValueError('The `mode` must be either "test"  or "train".')
  if rate <= 0. or rate > 1.:
    raise ValueError('The `rate` must be > 0. and <= 1.')

  def apply_fn(params, x, rng=None, **kwargs):
    if mode == 'test':
      return x
    if rng is None:
      raise ValueError('Dropout layer requires apply_fn to be called with a PRNG key '
                       'argument: apply_fn(params, inputs, rng=key).')
    keep = jax.random.bernoulli(rng, rate, x.shape)
    return jnp.where(keep, x / rate, 0)

  return Layer(lambda key, s: (s, ()), apply_fn, lambda p: (), uses_rng=mode == 'train')


def LayerNorm(axis=-1, eps: float = 1e-12, batch_axis: int = 0,
              channel_axis: int = -1) -> Layer:
  """`(x - mean) / sqrt(eps + var)` over `axis` (which must include the channel axis)."""

  def apply_fn(params, x, **kwargs):
    ax = (axis,) if isinstance(axis, int) else tuple(axis)
    ax = tuple(a % x.ndim for a in ax)
    mean = x.mean(ax, keepdims=True)
    var = ((x - mean)**2).mean(ax, keepdims=True)
    return (x - mean) / jnp.sqrt(eps + var)

  return Layer(lambda key, s: (s, ()), apply_fn, lambda p: ())


# Nonlinearities.


def Elementwise(fn: Optional[Callable] = None, nngp_fn: Optional[Callable] = None,
                d_nngp_fn: Optional[Callable] = None) -> Layer:
  """`fn` applied elementwise; the kernel is derived from `fn` (`nngp_fn` and
  `d_nngp_fn` are accepted for NT compatibility and unused)."""
  if fn is None:
    raise InfwidthError('Elementwise needs fn: infwidth derives the kernel from the '
                        'function itself and cannot use nngp_fn alone.')
  return _no_params(fn, lambda s: s)


def ElementwiseNumerical(fn: Callable, deg: int, df: Optional[Callable] = None) -> Layer:
  """`fn` applied elementwise, kernel by quadrature (`deg` and `df` unused: infwidth
  uses its own quadrature and autodiff)."""
  return _no_params(fn, lambda s: s)


def ABRelu(a: float, b: float, do_stabilize: bool = False) -> Layer:
  """`a * min(x, 0) + b * max(x, 0)`."""
  return _no_params(lambda x: a * jnp.minimum(x, 0) + b * jnp.maximum(x, 0), lambda s: s)


def Relu(do_stabilize: bool = False) -> Layer:
  """`max(x, 0)`."""
  return _no_params(lambda x: jnp.maximum(x, 0), lambda s: s)


def LeakyRelu(alpha: float, do_stabilize: bool = False) -> Layer:
  """`x` for `x >= 0`, `alpha * x` otherwise."""
  return ABRelu(alpha, 1, do_stabilize)


def Abs(do_stabilize: bool = False) -> Layer:
  """`|x|`."""
  return _no_params(jnp.abs, lambda s: s)


def Sign() -> Layer:
  """`sign(x)` (its NTK contribution is 0, as in NT)."""
  return _no_params(jnp.sign, lambda s: s)


def Erf(a: float = 1., b: float = 1., c: float = 0.) -> Layer:
  """`a * erf(b * x) + c`."""
  return _no_params(lambda x: a * jax.scipy.special.erf(b * x) + c, lambda s: s)


def Sigmoid_like() -> Layer:
  """The erf approximation of the logistic sigmoid used by NT."""
  return Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)


def Gelu(approximate: bool = False) -> Layer:
  """`jax.nn.gelu(x, approximate)`."""
  return _no_params(lambda x: jax.nn.gelu(x, approximate=approximate), lambda s: s)


def Sin(a: float = 1., b: float = 1., c: float = 0.) -> Layer:
  """`a * sin(b * x + c)`."""
  return _no_params(lambda x: a * jnp.sin(b * x + c), lambda s: s)


def Cos(a: float = 1., b: float = 1., c: float = 0.) -> Layer:
  """`a * cos(b * x + c)`."""
  return Sin(a=a, b=b, c=c + math.pi / 2)


def Rbf(gamma: float = 1.0) -> Layer:
  """`sqrt(2) * sin(sqrt(2 gamma) x + pi / 4)` (random Fourier features of an RBF kernel)."""
  return _no_params(lambda x: math.sqrt(2) * jnp.sin(math.sqrt(2 * gamma) * x + math.pi / 4),
                    lambda s: s)


def Exp(a: float = 1, b: float = 1) -> Layer:
  """`a * exp(b * x)`."""
  return _no_params(lambda x: a * jnp.exp(b * x), lambda s: s)


def Gaussian(a: float = 1, b: float = -1) -> Layer:
  """`a * exp(b * x^2)`."""
  return _no_params(lambda x: a * jnp.exp(b * x**2), lambda s: s)


def Monomial(degree: int) -> Layer:
  """`x ** degree` for `degree` in 0..5 (NT's range)."""
  if degree not in range(6):
    raise NotImplementedError('The `degree` must be an integer between `0` and `5`.')
  return _no_params(lambda x: x**degree, lambda s: s)


def RectifiedMonomial(degree: int) -> Layer:
  """`(x >= 0) * x ** degree` for a non-negative integer `degree`."""
  if degree < 0:
    raise NotImplementedError('`degree` must be a non-negative integer.')
  return _no_params(lambda x: jnp.where(x >= 0, x**degree, jnp.zeros((), x.dtype)), lambda s: s)


def Polynomial(coef: Sequence[float]) -> Layer:
  """`coef[0] + coef[1] * x + … + coef[n] * x ** n`."""
  return _no_params(functools.partial(_polyval, tuple(float(c) for c in coef[::-1])),
                    lambda s: s)


def Hermite(degree: int) -> Layer:
  """The probabilists' Hermite polynomial `He_degree(x) / sqrt(degree!)`.

  NT's kernel assumes inputs of unit variance (`E[He_n(u) He_n(v)] / n! = ρ^n`);
  the kernel here is derived from the polynomial itself, the same at unit
  variance and exact otherwise.
  """
  if degree < 0:
    raise NotImplementedError('`degree` must be a non-negative integer.')
  p = np.polynomial.hermite_e.herme2poly([0] * degree + [1])[::-1]
  norm = math.factorial(degree)**0.5
  return _no_params(lambda x: _polyval(tuple(float(c) for c in p), x) / norm, lambda s: s)


def _polyval(p: Tuple[float, ...], x):
  """`jnp.polyval(p, x)` (highest degree first) as a sum of powers of `x`
  (`jnp.polyval` is a `scan`, and in Horner's scheme `(a x + b) · x` multiplies
  two different combinations of `x`, which kernelize does not recognise as one
  function of `x`)."""
  n = len(p) - 1
  y = jnp.full_like(x, p[n])
  for k in range(1, n + 1):
    if p[n - k] != 0:
      y = y + p[n - k] * x**k
  return y


def Gabor() -> Layer:
  """`exp(-x^2) * sin(x)`."""
  return _no_params(lambda x: jnp.exp(-x**2) * jnp.sin(x), lambda s: s)


def ExpNormalized(gamma: float = 1, shift: float = -1, do_clip: bool = False) -> Layer:
  """NT's "Gaussian normalized kernel" `sqrt(q q') exp(gamma (ρ + shift))`
  (Shankar et al. 2020, p. 6), `q` the per-input variance and `ρ` the
  correlation of the pre-activations.

  NT defines only the kernel (its `apply_fn` raises). This `apply_fn` is a
  finite network with that kernel in the limit:
  `s · exp(gamma (shift - 1) / 2) · exp(sqrt(gamma) x / s)`, with
  `s = sqrt(mean(x^2))` over the channel (last) axis. `do_clip` is accepted
  and unused (the correlation of the limit is within [-1, 1]).
  """
  scale = math.exp(gamma * (shift - 1) / 2)
  root = math.sqrt(gamma)

  def fn(x):
    s = jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True))
    return s * scale * jnp.exp(root * x / s)

  return _no_params(fn, lambda s: s)


def _named(constructor: Callable) -> Callable:
  """`constructor` whose layer's functions carry its name (`Relu()[2].__name__
  == 'Relu'`), as NT names them: code that dispatches on a layer's kind reads it."""

  @functools.wraps(constructor)
  def make(*args, **kwargs):
    layer = constructor(*args, **kwargs)
    if isinstance(layer, Layer):
      for fn in layer:
        if '<locals>' in getattr(fn, '__qualname__', ''):   # made for this layer only
          fn.__name__ = constructor.__name__
    return layer

  return make


for _name in __all__:
  if _name not in ('Layer', 'unmask_fn') and inspect.isfunction(globals()[_name]):
    globals()[_name] = _named(globals()[_name])
del _name

"""Monte Carlo estimates of NNGP and NTK: averages of empirical kernels."""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Generator, Iterable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.empirical._utils import Axes, PyTree, VMapAxes
from infwidth.empirical.ntk import (DEFAULT_NTK_IMPLEMENTATION,
                                    NtkImplementation, _kernels)


def _positional_arity(fn: Callable) -> Optional[int]:
  """Number of positional parameters of `fn` (None: unknown or variadic)."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  n = 0
  for p in sig.parameters.values():
    if p.kind is p.VAR_POSITIONAL:
      return None
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
      n += 1
  return n


def _accepts_rng(fn: Callable) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == 'rng' or p.kind is p.VAR_KEYWORD for p in params)


def init_params(init_fn: Callable, key: jax.Array, x: PyTree) -> PyTree:
  """Parameters from `init_fn(key)` or from NT's `init_fn(key, input_shape)`.

  An `init_fn` taking two or more positional arguments follows NT's (and
  `jax.example_libraries.stax`'s) convention: it is called with the input
  shapes and returns `(output_shape, params)`. Otherwise `init_fn(key)`
  returns the parameters.
  """
  if (_positional_arity(init_fn) or 1) >= 2:
    shape = jax.tree.map(jnp.shape, x)
    _, params = init_fn(key, shape)
    return params
  return init_fn(key)


def _canonicalize_n_samples(n_samples) -> Tuple[Tuple[int, ...], bool]:
  if isinstance(n_samples, (int, np.integer)):
    counts, generator = (int(n_samples),), False
  elif hasattr(n_samples, '__iter__'):
    counts, generator = tuple(sorted(set(n_samples))), True
  else:
    raise TypeError('`n_samples` must be an int or an iterable of ints, got '
                    f'{type(n_samples)}.')
  if not counts or not all(isinstance(n, (int, np.integer)) and n > 0
                           for n in counts):
    raise ValueError(f'`n_samples` must be positive integers, got {n_samples}.')
  return tuple(int(n) for n in counts), generator


def _blocks(kernel: Callable, x1: PyTree, x2: Optional[PyTree], batch_size: int,
            trace_axes: Axes, diagonal_axes: Axes) -> PyTree:
  """`kernel(x1, x2)` computed in `batch_size` blocks of both inputs.

  Inputs are split along their leading axis and the output is assumed batched
  along its leading axis too (as in NT's `batch`).
  """
  n1 = jax.tree.leaves(x1)[0].shape[0]
  n2 = n1 if x2 is None else jax.tree.leaves(x2)[0].shape[0]
  if n1 % batch_size or n2 % batch_size:
    raise ValueError(f'`batch_size={batch_size}` must divide the numbers of '
                     f'inputs ({n1}, {n2}).')
  axes = lambda a: tuple(np.asarray(a).reshape(-1) if not isinstance(a, int)
                         else [a])
  if 0 in axes(trace_axes):
    raise ValueError('`batch_size` cannot split a traced batch axis; use '
                     '`batch_size=0`.')
  take = lambda x, i: jax.tree.map(lambda a: a[i:i + batch_size], x)
  xb2 = x1 if x2 is None else x2
  if 0 in axes(diagonal_axes):
    if n1 != n2:
      raise ValueError('A diagonal batch axis needs as many `x2` as `x1`.')
    parts = [kernel(take(x1, i), take(xb2, i))
             for i in range(0, n1, batch_size)]
    return jax.tree.map(lambda *b: jnp.concatenate(b, 0), *parts)
  rows = []
  for i in range(0, n1, batch_size):
    row = [kernel(take(x1, i), take(xb2, j)) for j in range(0, n2, batch_size)]
    rows.append(jax.tree.map(lambda *b: jnp.concatenate(b, 1), *row))
  return jax.tree.map(lambda *b: jnp.concatenate(b, 0), *rows)


def monte_carlo_kernel_fn(
    init_fn: Callable,
    apply_fn: Callable,
    key: jax.Array,
    n_samples: Union[int, Iterable[int]],
    batch_size: int = 0,
    device_count: int = -1,
    store_on_device: bool = True,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    implementation: Union[NtkImplementation, int] = DEFAULT_NTK_IMPLEMENTATION,
    vmap_axes: VMapAxes = None,
) -> Callable[..., Any]:
  """Monte Carlo NNGP and NTK: empirical kernels averaged over random draws.

  Args:
    init_fn: `init_fn(key) -> params`, or NT's
      `init_fn(key, input_shape) -> (output_shape, params)` (any `init_fn`
      with two or more positional parameters is called that way).
    apply_fn: `apply_fn(params, x, **kwargs)`. If it accepts `rng` (or
      `**kwargs`), it gets a fresh `rng` key per sample, as in NT.
    key: PRNG key; sample `i` uses the `i`-th split of it, as NT.
    n_samples: an int, or an iterable of ints: then `kernel_fn` returns a
      generator of the estimates at those counts (ascending), sharing samples.
    batch_size: if positive, each kernel is computed in blocks of this many
      inputs of `x1` and `x2` (it must divide both; inputs and outputs are
      batched along axis 0). `0`: one block.
    device_count: devices over which the samples are spread (each computes
      whole kernels of its own draws; the sum is the same up to rounding):
      `-1` all local devices, `0` or `1` the default device.
    store_on_device: `False` accumulates and returns NumPy arrays in host
      memory.
    trace_axes, diagonal_axes, implementation, vmap_axes: as in
      `empirical_kernel_fn`. Memory is that of one empirical kernel: the
      running sum is all that is kept between samples. The default Jacobian
      contraction builds `∂f/∂θ` for all `N·C` outputs (13 GB in float64 for
      a 3-layer MLP with 512 units and 512 outputs on 6 inputs); structured
      derivatives with `vmap_axes=0` run there in under 1 GB.

  Returns:
    `kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)` returning the mean of
    `n_samples` empirical kernels (`get` as in `empirical_kernel_fn`), or a
    generator of such means if `n_samples` is an iterable.
  """
  counts, generator = _canonicalize_n_samples(n_samples)
  if not isinstance(device_count, (int, np.integer)) or device_count < -1:
    raise ValueError(f'`device_count` must be -1, 0 or positive, got {device_count!r}.')
  if device_count > jax.local_device_count():
    raise ValueError(f'`device_count={device_count}` but only {jax.local_device_count()} '
                     'local devices exist.')
  devices = jax.local_devices()[:max(1, jax.local_device_count() if device_count == -1
                                     else device_count)]
  if batch_size < 0:
    raise ValueError(f'`batch_size` must be non-negative, got {batch_size}.')
  pass_rng = _accepts_rng(apply_fn)

  def samples(x1, x2, get, apply_fn_kwargs) -> Generator:
    def once(x1, x2, k):
      init_key, dropout_key = jax.random.split(k)
      params = init_params(init_fn, init_key, x1)
      kw = dict(apply_fn_kwargs, rng=dropout_key) if pass_rng else apply_fn_kwargs

      def kernel(a, b):
        return _kernels(apply_fn, a, b, get, params, kw, trace_axes,
                        diagonal_axes, vmap_axes, implementation, None)
      if batch_size:
        return _blocks(kernel, x1, x2, batch_size, trace_axes, diagonal_axes)
      return kernel(x1, x2)

    if len(devices) == 1:
      one = jax.jit(once)
      run = lambda keys: one(x1, x2, keys[0])
    else:
      spread = {m: jax.pmap(once, in_axes=(None, None, 0), devices=devices[:m])
                for m in range(1, len(devices) + 1)}
      # Each round's kernels are gathered on the first device and summed.
      run = lambda keys: jax.tree.map(lambda a: jax.device_put(a, devices[0]).sum(0),
                                      spread[len(keys)](x1, x2, jnp.stack(keys)))
    total, k, n = None, key, 0
    for count in counts:
      while n < count:
        keys = []
        for _ in range(min(len(devices), count - n)):
          k, split = jax.random.split(k)  # sample i: the i-th split, as in NT
          keys.append(split)
        sample = run(keys)
        if not store_on_device:
          sample = jax.device_get(sample)
        total = sample if total is None else jax.tree.map(operator.add, total, sample)
        n += len(keys)
      yield jax.tree.map(lambda t: t / n, total)

  def kernel_fn(x1: PyTree, x2: Optional[PyTree] = None, get=None,
                **apply_fn_kwargs):
    it = samples(x1, x2, get, apply_fn_kwargs)
    if generator:
      return it
    return next(it)

  return kernel_fn

"""The kernel computation of a function, traced once per batch shape.

`analytic_kernels` interprets `apply_fn`'s jaxpr on abstract values (the
kernel interpreter), turns each output into a `Kernel` through the moment
engine, and evaluates the resulting kernel computation with its repeated
blocks rolled into loops and, for spatial kernels, on blocks of input pairs.
Which values need full spatial blocks is decided before interpretation by
the requirements pass (`requirements.py`).
"""

from __future__ import annotations

import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.interpreters import memory
from infwidth.domain import moments as M
from infwidth.domain import pair_blocks
from infwidth.domain import values as A
from infwidth.domain.chain import Chain
from infwidth.domain.errors import InfwidthError, UnsupportedValueError
from infwidth.domain.joint_outputs import joint
from infwidth.domain.kernel import Kernel, build_kernel, interleave
from infwidth.domain.noise import RandomKey, is_key
from infwidth.domain.values import Det
from infwidth.interpreters.kernel_interpreter import interpret
from infwidth.interpreters.loop_rolling import eval_rolled
from infwidth.interpreters.requirements import requirements
from infwidth.interpreters.loops import unroll_loops
from infwidth.interpreters.sizes import largest_value
from infwidth.interpreters.walker import trace

#: Track only equal spatial positions where the output allows (DESIGN §5).
#: Setting it to False tracks full spatial blocks: same values, more cost.
DIAGONAL_SPATIAL = True


def analytic_kernels(apply_fn, shapes, leaves_info, x1, x2, x1_is_x2, apply_kwargs,
                     gets=None):
  """The `Kernel`s (a pytree like the outputs) of `apply_fn` at `x1`, `x2`."""
  if isinstance(x1, Kernel):
    moments, xj, x_val = _kernel_input(x1)
    return _joint(_interpret(apply_fn, shapes, leaves_info, moments, xj, x_val, apply_kwargs),
                  gets)
  # Inputs may be a pytree of arrays (several inputs, NT's `parallel` first
  # layers), each with the batch axis first.
  x1 = jax.tree_util.tree_map(jnp.asarray, x1)
  leaves = jax.tree_util.tree_leaves(x1)
  # Integer and boolean inputs stay as they are (token ids for an embedding
  # lookup); the kernel is computed in the parameters' float dtype.
  floats = [l.dtype for l in leaves if jnp.issubdtype(l.dtype, jnp.floating)]
  dtype = jnp.result_type(*floats) if floats else _float_dtype(shapes)
  x2 = None if x1_is_x2 else jax.tree_util.tree_map(lambda b, a: jnp.asarray(b, a.dtype), x2, x1)
  n1 = leaves[0].shape[0]
  n2 = n1 if x2 is None else jax.tree_util.tree_leaves(x2)[0].shape[0]
  spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x1)
  traced_x = any(isinstance(l, jax.core.Tracer) for l in leaves)
  traces = {}

  def traced(r1, r2, same):
    """The kernel computation for batches of r1 and r2 inputs (memoised)."""
    if (r1, r2, same) not in traces:
      traces[r1, r2, same] = _trace_kernels(apply_fn, shapes, leaves_info, apply_kwargs,
                                            spec, r1, r2, same, dtype)
    return traces[r1, r2, same]

  def pair_kernels(a, b):
    n_a = jax.tree_util.tree_leaves(a)[0].shape[0]
    n_b = jax.tree_util.tree_leaves(b)[0].shape[0]
    return _eval_kernels(*traced(n_a, n_b, False), _joined(a, b), gets)

  # Spatial kernels are computed on blocks of input pairs, sized from the
  # entries of each pair's largest intermediate.
  whole = traced(n1, n2, x2 is None)
  per_pair = largest_value(whole[0].jaxpr, lead=(n1, n2)) // max(n1 * n2, 1)
  rows = pair_blocks.block_rows(n1, n2, per_pair)
  if x2 is None and has_keys(apply_kwargs):
    # Random masks are shared by the same inputs of one batch only: its
    # blocks would pair the diagonal ones as different inputs.
    rows = None
  _check_memory(whole[0].jaxpr, None if rows is None else traced(rows, rows, False)[0].jaxpr,
                n1, n2, rows, symmetric=x2 is None, fused=traced_x,
                joint_loop=traced_x and _joint_loop(gets))
  if rows is not None:
    return pair_blocks.blocked_kernel(pair_kernels, x1, x2, rows)
  return _eval_kernels(*whole, x1 if x2 is None else _joined(x1, x2), gets)


def _joined(a, b):
  """The joint batch of two input pytrees: each leaf concatenated."""
  return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v]), a, b)


def _check_memory(whole, block, n1, n2, rows, symmetric, fused, joint_loop):
  """Raises `KernelMemoryError` before a computation that cannot fit.

  Computed at once: the whole jaxpr's peak. On blocks of `rows` pairs (one
  compiled loop): the computed blocks stacked (those on and above the
  diagonal only when `symmetric`), the assembled results and one block's
  peak. `fused`: the computation is traced into a compiled program (under
  `jit`). `joint_loop`: the NNGP and NTK come from one loop (`_joint`) that
  reads each result padded to twice its size; the padding is formed once the
  recursion's intermediates are dead, so it raises the peak only where the
  results and their padded copies exceed it (measured in
  `benchmarks/bench_memory_estimate.py`)."""
  def with_joint(peak, out):
    return max(peak, 3 * out) if joint_loop else peak

  out = memory.output_bytes(whole)
  if block is None:
    peak = with_joint(memory.peak_bytes(whole, fused), out)
  else:
    nb1, nb2 = -(-n1 // rows), -(-n2 // rows)
    computed = nb1 * (nb1 + 1) // 2 if symmetric else nb1 * nb2
    stacked = out * computed // (nb1 * nb2)
    peak = out + stacked + with_joint(memory.peak_bytes(block, fused=True),
                                      memory.output_bytes(block))
  memory.check_fits(peak, out, n1, n2)


def _float_dtype(shapes):
  """The working dtype for inputs that are not floats: the parameters' float
  dtype, else JAX's default float."""
  floats = [l.dtype for l in jax.tree_util.tree_leaves(shapes)
            if jnp.issubdtype(l.dtype, jnp.floating)]
  return jnp.result_type(*floats) if floats else jnp.result_type(float)


def _trace_kernels(apply_fn, shapes, leaves_info, apply_kwargs, spec, n1, n2, x1_is_x2,
                   dtype):
  """The kernel computation for `n1` and `n2` inputs (the same inputs if
  `x1_is_x2`) as a jaxpr of their joint batch, computed in `dtype`: `(closed
  jaxpr, output treedef)`. `spec`: a pytree of `ShapeDtypeStruct`s, each
  input's shape and dtype without the batch axis."""
  out_tree = []
  specs, in_tree = jax.tree_util.tree_flatten(spec)

  def kernels_of(*xj):
    x_vals = [Det(x, ('b',) + _input_roles(k if len(xj) > 1 else None, x.ndim))
              for k, x in enumerate(xj)]
    k = _interpret(apply_fn, shapes, leaves_info, (n1, n2, x1_is_x2, dtype),
                   jax.tree_util.tree_unflatten(in_tree, xj), x_vals, apply_kwargs)
    leaves, tree = jax.tree_util.tree_flatten(k)
    out_tree.append(tree)
    return leaves

  n_joint = n1 if x1_is_x2 else n1 + n2
  with _deep_recursion():
    closed = trace(kernels_of, *[jax.ShapeDtypeStruct((n_joint,) + s.shape, s.dtype)
                                 for s in specs])
  return closed, out_tree[0]


#: Python frames the moment engine may need: it recurses through the values
#: a kernel depends on, about ten frames per layer or loop step.
RECURSION_LIMIT = 20_000


@contextlib.contextmanager
def _deep_recursion():
  """A recursion limit for networks hundreds of layers (or steps) deep."""
  old = sys.getrecursionlimit()
  sys.setrecursionlimit(max(old, RECURSION_LIMIT))
  try:
    yield
  finally:
    sys.setrecursionlimit(old)


def _input_roles(leaf, ndim):
  """Spatial roles of an input's axes after the batch axis: one per axis and
  input (`leaf`: its index among several inputs, or None)."""
  return tuple(f'x{i}' if leaf is None else f'x{leaf}_{i}' for i in range(1, ndim))


def _eval_kernels(closed, out_tree, xj, gets):
  # Evaluated with its repeated blocks (one per layer of a deep network) as
  # scans: XLA:CPU compiles a long unrolled program slowly and recomputes
  # across its layers.
  return _joint(jax.tree_util.tree_unflatten(
      out_tree, eval_rolled(closed, *jax.tree_util.tree_leaves(xj))), gets)


def _joint(kernels, gets):
  """Each kernel's NNGP and NTK from one fused loop, which computes what their
  recursions share once (under a trace, when both are asked for: `gets`).

  Only on CPU: XLA's GPU and TPU compilers fuse loops with several outputs
  themselves.
  """
  if not _joint_loop(gets):
    return kernels

  def one(k: Kernel):
    if k.ntk is None or not isinstance(k.nngp, jax.core.Tracer):
      return k
    nngp, ntk = joint((k.nngp, k.ntk))
    return k.replace(nngp=nngp, ntk=ntk)
  return jax.tree_util.tree_map(one, kernels, is_leaf=lambda v: isinstance(v, Kernel))


def _joint_loop(gets) -> bool:
  return (gets is None or {'nngp', 'ntk'} <= set(gets)) and jax.default_backend() == 'cpu'


def _interpret(apply_fn, shapes, leaves_info, batches, xj, x_val, apply_kwargs) -> Kernel:
  """The kernels of `apply_fn`'s outputs for the joint batch `xj` (abstract
  value `x_val`); `batches` is `(n1, n2, x1_is_x2, dtype)`, or a `Moments`."""
  # PRNG keys among the keyword arguments are inputs of the jaxpr (random
  # masks), not constants to fold.
  key_specs, key_vals, with_keys = _keys_as_inputs(apply_kwargs)
  closed, out_shapes = trace(lambda p, x, k: apply_fn(p, x, **with_keys(k)), shapes, xj,
                             key_specs, return_shape=True)
  closed = unroll_loops(closed)
  if isinstance(batches, M.Moments):
    moments = batches
  else:
    # Pixel diagonals only where no output keeps spatial axes (DESIGN §5);
    # the moment engine then tracks full blocks below pooling only.
    diag = (DIAGONAL_SPATIAL and any(jnp.ndim(l) > 2 for l in jax.tree_util.tree_leaves(xj))
            and requirements(closed).pixel_diagonal)
    moments = M.Moments(*batches, diag=diag)
  param_vals = [A.ParamRef(l, l.shape, tuple(range(len(l.shape)))) for l in leaves_info]
  x_vals = x_val if isinstance(x_val, list) else [x_val]
  outs = interpret(closed.jaxpr, closed.consts, param_vals + x_vals + key_vals, moments)
  return _kernels(outs, out_shapes, moments)


def has_keys(apply_kwargs) -> bool:
  return any(is_key(l) for l in jax.tree_util.tree_leaves(apply_kwargs))


def _keys_as_inputs(apply_kwargs):
  """The PRNG keys among `apply_kwargs` as jaxpr inputs: their specs, their
  abstract values (`RandomKey`s holding a fixed stand-in key each: the
  kernel does not depend on the key, and keys in different arguments are
  different keys) and `with_keys(keys)`, the arguments with them put back."""
  leaves, tree = jax.tree_util.tree_flatten(apply_kwargs)
  where = [i for i, l in enumerate(leaves) if is_key(l)]
  specs = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in where]
  vals = [RandomKey(Det(_stand_in(leaves[i], k), (None,) * len(leaves[i].shape)))
          for k, i in enumerate(where)]

  def with_keys(keys):
    out = list(leaves)
    for i, key in zip(where, keys):
      out[i] = key
    return jax.tree_util.tree_unflatten(tree, out)
  return specs, vals, with_keys


def _stand_in(key, k: int):
  """A concrete key of `key`'s shape and kind, the `k`-th of its stand-ins."""
  with jax.ensure_compile_time_eval():
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      base = jax.random.key(1 + k, impl=jax.random.key_impl(key))
      n = int(np.prod(key.shape, dtype=int))
      keys = jax.random.split(base, max(n, 1))[:n] if key.shape else base
      return keys.reshape(key.shape)
    n = int(np.prod(key.shape[:-1], dtype=int))
    data = jax.random.key_data(jax.random.split(jax.random.key(1 + k), max(n, 1))[:n])
    return np.asarray(data, np.uint32).reshape(key.shape)


def _kernels(outs, out_shapes, moments):
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out_shapes)[0]]
  kernels = [_output_kernel(out, moments, path if len(outs) > 1 else '')
             for out, path in zip(outs, paths)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shapes), kernels)


def _kernel_input(k: Kernel):
  """A Kernel in place of x1: a Gaussian input whose channel axis is wide (NT's
  composition `kernel_fn(kernel_fn_prev(x1, x2))`)."""
  if k.nngp is None or jnp.ndim(k.nngp) != 2:
    raise InfwidthError('a Kernel in place of x1 must have an (N1, N2) nngp (no spatial '
                        f'axes yet); got shape {None if k.nngp is None else jnp.shape(k.nngp)}.')
  if k.cov1 is None:
    raise InfwidthError('a Kernel in place of x1 needs cov1 (and cov2 unless x1_is_x2).')
  n1, n2 = jnp.shape(k.nngp)
  dtype = jnp.result_type(k.nngp)
  n_joint = n1 if k.x1_is_x2 else n1 + n2
  shape = (n_joint,) + tuple(k.shape1[1:]) if k.shape1 else (n_joint, 1)
  if len(shape) != 2:
    raise InfwidthError(f'a Kernel in place of x1 must describe (N, C) outputs; got {k.shape1}.')
  src = A.KernelSource(k)
  x_val = A.Wide(shape, ('b', 'c'), (A.Term(Chain(), A.combo_of(src, ())),))
  return M.Moments(n1, n2, k.x1_is_x2, dtype), jax.ShapeDtypeStruct(shape, dtype), x_val


def _output_kernel(out, moments: M.Moments, path: str = '') -> Kernel:
  """The `Kernel` of one output of the function (per output channel); `path`
  names the output among several."""
  n1, n2, x1_is_x2, dtype = moments.n1, moments.n2, moments.x1_is_x2, moments.dtype
  if isinstance(out, A.Det) and _exact_zero(out.value):
    # An output that is exactly zero for every input (a wide value times 0,
    # `ABRelu(0, 0)`): a degenerate Gaussian with zero NNGP and NTK, as in NT.
    sp = tuple(n for n, r in zip(out.shape, out.roles) if r not in ('b', 'c', None))
    zero = lambda lead: interleave(0.0, lead, sp, dtype)
    return build_kernel(zero((n1, n2)), zero((n1, n2)), zero((n1,)),
                        None if x1_is_x2 else zero((n2,)),
                        shape1=(n1,) + tuple(out.shape[1:]), shape2=(n2,) + tuple(out.shape[1:]),
                        x1_is_x2=x1_is_x2, spatial_shape=sp,
                        batch_axis=out.roles.index('b') if 'b' in out.roles else 0,
                        is_gaussian=True, dtype=dtype)
  if not isinstance(out, A.Wide):
    which = f'output {path} of apply_fn' if path else 'the output of apply_fn'
    fix = (' (return only the outputs that go through the network, or compute this one '
           'outside apply_fn)' if path else '')
    raise UnsupportedValueError(
        f'{which} does not depend on any parameter through a linear '
        'map with a channel axis, so it has no infinite-width limit (no wide axis found)'
        + fix)
  if A.channel_dependent(out):
    which = f'output {path} of apply_fn' if path else 'the output of apply_fn'
    raise UnsupportedValueError(
        f'{which} holds per-channel arrays with distinct entries along its output axis '
        '(e.g. a BatchNorm after the readout): its output channels are not identically '
        'distributed, so there is no kernel per output channel; apply a linear readout '
        'after them.')
  st = moments.wide_pair(out, out)
  ntk = moments.wide_ntk(out, out)
  if out.hidden:  # a flattened output: per-channel moments averaged over its channels
    st, ntk = _average_hidden(out, moments, st, ntk)
  sp = _spatial_shape(out)
  return build_kernel(interleave(st.cross, (n1, n2), sp, dtype),
                      interleave(ntk, (n1, n2), sp, dtype),
                      interleave(st.diag1, (n1,), sp, dtype),
                      None if x1_is_x2 else interleave(st.diag2, (n2,), sp, dtype),
                      shape1=(n1,) + tuple(out.shape[1:]), shape2=(n2,) + tuple(out.shape[1:]),
                      x1_is_x2=x1_is_x2, spatial_shape=sp,
                      batch_axis=out.roles.index('b') if 'b' in out.roles else 0,
                      channel_axis=out.channel_axis, is_gaussian=_is_gaussian(out), dtype=dtype)


def _exact_zero(value) -> bool:
  return not isinstance(value, jax.core.Tracer) and not np.any(np.asarray(value))


def _average_hidden(out: A.Wide, moments: M.Moments, st, ntk):
  """The moments of an output whose channel axis also runs over spatial
  positions (a Flatten as the last layer): its channels `(s, c)` are averaged,
  `(1/S) Σ_s E[y_s y′_s]` at equal positions, NT's Flatten kernel."""
  roles = tuple(r for r, _ in out.hidden)
  count = float(np.prod([n for _, n in out.hidden]))
  sp = out.spatial

  def average(block, lead):
    if isinstance(block, float):
      return block
    return M.trace_spatial(block, lead, sp, sp, roles, moments.diag) / count

  st = A.PairStats(average(st.cross, 2), average(st.diag1, 1), average(st.diag2, 1))
  return st, average(ntk, 2)


def _is_gaussian(w: A.Wide) -> bool:
  """NT's `is_gaussian`: Gaussian sources combined linearly, plus a deterministic
  offset (no nonlinearity), and not flattened (whose channels are not i.i.d.)."""
  if isinstance(w, A.DetChannels):
    return True  # deterministic channels: Gaussian with no variance (NT's input)
  if isinstance(w, A.ChannelConcat):
    return all(_is_gaussian(p) for p in w.parts)
  gaussian = lambda s: (s.gaussian if isinstance(s, A.MappedSource) else
                        s.kernel.is_gaussian if isinstance(s, A.KernelSource) else True)
  return not w.hidden and bool(w.terms) and not A.has_noise(w) and all(
      t.is_gaussian and all(gaussian(s) for s in t.combo.sources) for t in w.terms)


def _spatial_shape(w: A.Wide):
  return tuple(w.shape[i] for i, r in enumerate(w.roles) if r not in ('b', 'c', None))


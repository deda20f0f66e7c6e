"""Elementwise chains: a scalar function φ(u, *args) traced from primitives.

A maximal elementwise subgraph applied to one Gaussian value `u` becomes one
`Chain` (DESIGN §2). Its nodes are first-order elementwise primitives; each
operand refers to the Gaussian input `u`, a per-input argument (a
deterministic array such as a LayerNorm scale `a(x)`, broadcast against `u`),
a constant, or an earlier node. The last node is the chain's output; a chain
with no nodes is the identity.

Chains are hashable and compared by structure, so closed forms are
recognised by looking at `nodes`, and derivatives come from `jax.grad`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as _P


@dataclasses.dataclass(frozen=True)
class Ref:
  """An operand of a chain node.

  kind: 'u' (the Gaussian input), 'arg' (per-input argument `index`),
    'const' (the Python/NumPy scalar `value`), or 'node' (output of node `index`).
  """
  kind: str
  index: int = 0
  value: Any = None

  def __hash__(self):
    return hash((self.kind, self.index, _hashable(self.value)))

  def __eq__(self, other):
    return (isinstance(other, Ref) and self.kind == other.kind and
            self.index == other.index and
            _hashable(self.value) == _hashable(other.value))


U = Ref('u')


def arg(i: int) -> Ref:
  return Ref('arg', i)


def const(value) -> Ref:
  return Ref('const', value=np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value))


def node(j: int) -> Ref:
  return Ref('node', j)


def _hashable(v):
  if isinstance(v, np.ndarray):
    return (v.shape, str(v.dtype), v.tobytes())
  return v


@dataclasses.dataclass(frozen=True)
class Node:
  """`prim.bind(*operands, **dict(params))`."""
  prim: Any
  params: Tuple[Tuple[str, Any], ...]
  operands: Tuple[Ref, ...]


@dataclasses.dataclass(frozen=True)
class Chain:
  """φ(u, *args) as a DAG of elementwise primitives; no nodes means φ(u) = u."""
  nodes: Tuple[Node, ...] = ()
  n_args: int = 0

  @property
  def is_identity(self) -> bool:
    return not self.nodes

  def __call__(self, u, *args):
    """Evaluates φ elementwise; `u` and `args` broadcast against each other."""
    if len(args) != self.n_args:
      raise TypeError(f'chain takes {self.n_args} arguments, got {len(args)}')
    if not self.nodes:
      return u
    shape = jnp.broadcast_shapes(jnp.shape(u), *(jnp.shape(a) for a in args))
    dtype = jnp.result_type(u)
    u = jnp.broadcast_to(u, shape)
    args = [jnp.broadcast_to(jnp.asarray(a, dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, shape)
            for a in args]
    outs = []
    for n in self.nodes:
      vals = []
      for r in n.operands:
        if r.kind == 'u':
          vals.append(u)
        elif r.kind == 'arg':
          vals.append(args[r.index])
        elif r.kind == 'node':
          vals.append(outs[r.index])
        else:
          c = np.asarray(r.value)
          if np.issubdtype(c.dtype, np.floating):
            c = c.astype(dtype)
          vals.append(jnp.broadcast_to(c, shape))
      params = dict(n.params)
      if 'new_dtype' in params and jnp.issubdtype(params['new_dtype'], jnp.floating):
        # Casts inside the user's function keep the kernel's working precision.
        params['new_dtype'] = jnp.dtype(dtype)
      outs.append(n.prim.bind(*vals, **params))
    return outs[-1]

  def derivative(self):
    """φ'(u, *args): the derivative in `u`, elementwise, via `jax.grad`."""
    def dphi(u, *args):
      shape = jnp.broadcast_shapes(jnp.shape(u), *(jnp.shape(a) for a in args))
      u = jnp.broadcast_to(u, shape)
      g = lambda u_: jnp.sum(self(u_, *args))
      return jax.grad(g)(u)
    return dphi


def _keyword_params(fn) -> dict:
  """The keyword-only parameters `fn` binds its primitive with, at their
  defaults (`lax.mul`'s `out_dtype` in recent JAX versions; their transposes
  require them)."""
  sig = inspect.signature(fn)
  return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def polynomial_degree(chain: 'Chain', n_gauss: int = 1):
  """The total degree of `chain` as a polynomial in its first `n_gauss` inputs
  (`u` and the first `n_gauss − 1` arguments; the other arguments and
  constants are coefficients), or None if it is not a polynomial in them."""
  if chain.is_identity:
    return 1
  degree = []

  def of(r: Ref):
    if r.kind == 'u':
      return 1
    if r.kind == 'arg':
      return 1 if r.index < n_gauss - 1 else 0
    if r.kind == 'node':
      return degree[r.index]
    return 0

  for n in chain.nodes:
    ds = [of(r) for r in n.operands]
    if any(d is None for d in ds):
      degree.append(None)
    elif n.prim in (_P.add_p, _P.sub_p, _P.neg_p, _P.convert_element_type_p, _P.copy_p):
      degree.append(max(ds))
    elif n.prim is _P.mul_p:
      degree.append(sum(ds))
    elif n.prim is _P.div_p and ds[1] == 0:
      degree.append(ds[0])
    elif n.prim is _P.integer_pow_p and dict(n.params)['y'] >= 0:
      degree.append(ds[0] * dict(n.params)['y'])
    elif n.prim is _P.square_p:
      degree.append(2 * ds[0])
    else:
      degree.append(None if max(ds) > 0 else 0)
  return degree[-1]


#: Binary primitives the interpreter adds to chains itself, with the parameters
#: they are bound with (those of `lax.add` and `lax.mul`; a test checks them
#: against their jaxprs).
BINARY = {'add': (_P.add_p, _keyword_params(jax.lax.add)),
          'mul': (_P.mul_p, _keyword_params(jax.lax.mul))}


class ChainBuilder:
  """Builds a `Chain` node by node; `inline` splices in an existing chain."""

  def __init__(self, n_args: int = 0):
    self.nodes = []
    self.n_args = n_args

  def new_arg(self) -> Ref:
    self.n_args += 1
    return arg(self.n_args - 1)

  def binary(self, name: str, x: Ref, y: Ref) -> Ref:
    """Adds `x + y` (name 'add') or `x * y` (name 'mul')."""
    prim, params = BINARY[name]
    return self.add(prim, params, (x, y))

  def add(self, prim, params, operands) -> Ref:
    self.nodes.append(Node(prim, tuple(sorted(params.items())), tuple(operands)))
    return node(len(self.nodes) - 1)

  def inline(self, chain: Chain, u_ref: Ref, arg_refs) -> Ref:
    """Adds `chain`'s nodes with `u` ↦ `u_ref` and `arg i` ↦ `arg_refs[i]`; returns its output."""
    if chain.is_identity:
      return u_ref
    base = len(self.nodes)

    def remap(r: Ref) -> Ref:
      if r.kind == 'u':
        return u_ref
      if r.kind == 'arg':
        return arg_refs[r.index]
      if r.kind == 'node':
        return node(base + r.index)
      return r

    for n in chain.nodes:
      self.nodes.append(Node(n.prim, n.params, tuple(remap(r) for r in n.operands)))
    return node(len(self.nodes) - 1)

  def build(self, out: Ref) -> Chain:
    if out.kind == 'u' and not self.nodes:
      return Chain((), self.n_args)
    nodes = list(self.nodes)
    if not (out.kind == 'node' and out.index == len(nodes) - 1):
      # The output must be the last node: add an explicit copy.
      nodes.append(Node(_P.convert_element_type_p,
                        (('new_dtype', np.dtype('float32')), ('sharding', None), ('weak_type', False)),
                        (out,)))
    return Chain(tuple(nodes), self.n_args)



def derivative(chain: Chain, i: int):
  """`∂φ/∂(input i)` of `φ(u, *args)` as a chain of the same arguments
  (input 0 is `u`, input `k ≥ 1` argument `k − 1`), written node by node
  (forward mode), so that the closed forms recognise it: the derivative of
  `max(p·u + q, 0)` in `p` is `select(p·u + q > 0, u, 0)`, a ReLU of `u`.
  None where a primitive has no rule here (the caller differentiates
  numerically)."""
  if chain.is_identity:
    return None
  b = ChainBuilder(chain.n_args)
  b.nodes = list(chain.nodes)   # the primal values keep their indices
  one = object()                # a tangent equal to 1
  tangent = {}

  def t_of(r):
    if r.kind == 'u':
      return one if i == 0 else None
    if r.kind == 'arg':
      return one if r.index + 1 == i else None
    if r.kind == 'node':
      return tangent[r.index]
    return None

  def ref(t):
    return const(1.0) if t is one else (const(0.0) if t is None else t)

  def times(t, x):
    return None if t is None else (x if t is one else b.binary('mul', t, x))

  def plus(s, t):
    if s is None or t is None:
      return t if s is None else s
    return b.binary('add', ref(s), ref(t))

  def neg(t):
    return None if t is None else b.add(_P.neg_p, {}, (ref(t),))

  for k, n in enumerate(chain.nodes):
    ts = [t_of(r) for r in n.operands]
    x, p = n.operands, n.prim
    params = dict(n.params)
    if all(t is None for t in ts):
      t = None
    elif p is _P.add_p:
      t = plus(*ts)
    elif p is _P.sub_p:
      t = plus(ts[0], neg(ts[1]))
    elif p is _P.neg_p:
      t = neg(ts[0])
    elif p is _P.mul_p:
      t = plus(times(ts[0], x[1]), times(ts[1], x[0]))
    elif p is _P.div_p and ts[1] is None:
      t = b.add(_P.div_p, {}, (ref(ts[0]), x[1]))
    elif p in (_P.max_p, _P.min_p):
      pred = b.add(_P.gt_p if p is _P.max_p else _P.lt_p, {}, tuple(x))
      t = b.add(_P.select_n_p, {}, (pred, ref(ts[1]), ref(ts[0])))
    elif (p in (_P.convert_element_type_p, _P.copy_p)
          and jnp.issubdtype(params.get('new_dtype') or np.dtype(float), jnp.floating)):
      t = ts[0]
    else:
      return None
    tangent[k] = t
  out = tangent[len(chain.nodes) - 1]
  if out is None or out is one or out.kind != 'node' or out.index != len(b.nodes) - 1:
    out = b.binary('add', ref(out), const(0.0))
  return b.build(out)

"""Collapsing a wide value into one elementwise chain: `φ(u, *gargs, *pargs,
*dargs)` of one Gaussian combination `u` (and, where allowed, of further
Gaussian combinations `gargs`). The rules use it for nonlinearities of wide
values; the moment engine uses it for a joint expectation of two values whose
products of independent parts are correlated across the pair (a GRU state).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from infwidth.domain import values as A
from infwidth.domain.chain import ChainBuilder, U, const
from infwidth.domain.errors import InternalError, UnsupportedValueError


def A_arg(i):
  from infwidth.domain.chain import arg
  return arg(i)


def collapse(w: A.Wide, b: ChainBuilder, pargs: list, dargs: list,
             combo: Optional[A.Combo], gargs: Optional[list] = None
             ) -> Tuple[Any, Optional[A.Combo]]:
  """Adds `w`'s value to builder `b` as a function of one Gaussian combination `u`
  (and, where `gargs` is a list, of further Gaussian combinations).

  `u` is, if possible, a whole combination (zero-variance parameters such as
  zero-initialised biases stay inside it, so closed forms still apply); terms
  over proportional combinations use `α·u`. Otherwise only the random parts
  must be proportional and the deterministic-valued parts become parameter
  arguments of the chain.

  Args:
    w: the wide value.
    b: the chain under construction; new arguments are appended to `pargs`
      (parameter arguments), `dargs` (deterministic arrays) or `gargs`
      (further Gaussian combinations) as `(index, value)` pairs, in creation
      order.
    combo: the combination already chosen by earlier operands, or None.
    gargs: None to allow one Gaussian only; else a list collecting the random
      combinations not proportional to `u`, each a new chain argument.

  Returns:
    (reference to the value in `b`, the chosen combination).
  Raises:
    SeveralGaussians: if `gargs` is None and the value depends on two
      different random combinations (a product of independent
      pre-activations, as in gating).
  """
  whole = combo
  if gargs is None:
    for t in w.terms:
      whole = whole or t.combo
      if t.cofactors or t.gargs or A.combo_ratio(t.combo, whole) is None:
        break
    else:
      if whole is not None:
        return _collapse(w, b, pargs, dargs, whole, False, None), whole
  if combo is None:
    combo = next((r for t in w.terms for part in t.parts
                  for r in (A.split_random(part.combo)[0],) if r is not None), None)
  return _collapse(w, b, pargs, dargs, combo, True, gargs), combo


class NotGaussian(UnsupportedValueError):
  """An elementwise map of a value that is not Gaussian: the calling rule
  reports it as unsupported, so that the fallbacks apply."""


class SeveralGaussians(UnsupportedValueError):
  """An elementwise operation of values over different Gaussian combinations:
  one chain of one Gaussian cannot hold it (a product of independent values
  can still be a term with cofactors, `multiply_independent`)."""


def _collapse(w, b, pargs, dargs, combo, split: bool, gargs):

  def new_parg(p):
    r = b.new_arg()
    pargs.append((r.index, p))
    return r

  def new_darg(d):
    r = b.new_arg()
    dargs.append((r.index, d))
    return r

  def scaled(ref, ratio):
    if isinstance(ratio, float):
      return ref if ratio == 1.0 else b.binary('mul', ref, const(ratio))
    return b.binary('mul', ref, new_darg(ratio))

  def gaussian_ref(rnd):
    """`rnd` as `α·u`, as `α·g` for an earlier further Gaussian `g`, or new."""
    ratio = A.combo_ratio(rnd, combo) if combo is not None else None
    if ratio is not None:
      return scaled(U, ratio)
    for index, g in (gargs or ()):
      ratio = A.combo_ratio(rnd, g)
      if ratio is not None:
        return scaled(A_arg(index), ratio)
    if gargs is None:
      raise SeveralGaussians(
          'an elementwise operation combines two different random Gaussian '
          'values (e.g. a product of independent pre-activations, as in gating); '
          'kernels of such products are not supported yet; use '
          'fallback="monte_carlo".')
    r = b.new_arg()
    gargs.append((r.index, rnd))
    return r

  def part_ref(t):
    if A.has_noise(t):
      raise NotGaussian(
          'a nonlinearity of a value multiplied by a random mask (dropout) in a form the '
          'mixture over the mask does not cover; use fallback="monte_carlo"')
    rnd, det = A.split_random(t.combo) if split else (t.combo, None)
    if any(isinstance(src, A.MappedSource) and src.per_channel for src in t.combo.sources):
      raise NotGaussian(
          'a nonlinearity of a pooled (or summed over positions) value with per-channel '
          'arrays (e.g. BatchNorm statistics): each channel has its own Gaussian, which '
          'the map mixes over positions; this is not supported yet (pool after the '
          'nonlinearity, or before the per-channel arrays)')
    if any(isinstance(src, A.MappedSource) and not src.gaussian for src in t.combo.sources):
      raise NotGaussian(
          'a nonlinearity of a pooled (or summed) non-Gaussian value: its distribution is '
          'not Gaussian, so no two-dimensional expectation gives its kernel')
    u = None if rnd is None else gaussian_ref(rnd)
    if det is not None:
      d = new_parg(det)
      u = d if u is None else b.binary('add', u, d)
    if u is None:
      raise InternalError('empty combination')
    args = ([gaussian_ref(g) for g in t.gargs] + [new_parg(p) for p in t.pargs]
            + [new_darg(d) for d in t.dargs])
    r = b.inline(t.chain, u, args)
    for f in t.factors:
      if f.random:
        # A random scale (BatchNorm's γ) inside a nonlinearity: one more
        # Gaussian of the chain (γ is a Gaussian source with its moments).
        if gargs is None:
          raise SeveralGaussians(
              f'parameter {f.leaf.name!r} (with nonzero variance) multiplies a value '
              'inside a nonlinearity')
        r = b.binary('mul', r, gaussian_ref(A.combo_of(f, t.combo.spatial)))
        continue
      r = b.binary('mul', r, new_parg(A.combo_of(f, t.combo.spatial)))
    return r

  refs = []
  for t in w.terms:
    if t.cofactors and gargs is None:
      raise SeveralGaussians(
          'a nonlinearity of a product of independent Gaussian values (such as tanh of '
          'an LSTM cell state) needs a joint integral over several Gaussians')
    r = None
    for part in t.parts:
      pr = part_ref(part)
      r = pr if r is None else b.binary('mul', r, pr)
    refs.append(r)
  if w.offset is not None:
    refs.append(new_darg(w.offset))
  if not refs:
    raise InternalError('empty wide value')
  out = refs[0]
  for r in refs[1:]:
    out = b.binary('add', out, r)
  return out


def finish_term(b: ChainBuilder, out, combo: Optional[A.Combo], pargs: list, dargs: list,
                spatial, gargs=()) -> A.Term:
  """Builds the term `chain(u, *gargs, *pargs, *dargs)`, renumbering arguments
  into that order (the order `Term` evaluates them in)."""
  from infwidth.domain.chain import Node, arg
  order = [i for i, _ in gargs] + [i for i, _ in pargs] + [i for i, _ in dargs]
  new_index = {i: k for k, i in enumerate(order)}
  remap = lambda r: arg(new_index[r.index]) if r.kind == 'arg' else r
  b.nodes = [Node(n.prim, n.params, tuple(remap(r) for r in n.operands)) for n in b.nodes]
  out = remap(out)
  chain = b.build(out)
  if combo is None:
    combo = A.Combo((), (), tuple(spatial), 0.0)
  return A.Term(chain, combo, tuple(p for _, p in pargs), tuple(d for _, d in dargs),
                gargs=tuple(g for _, g in gargs))

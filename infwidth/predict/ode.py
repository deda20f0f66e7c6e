"""An adaptive Dormand–Prince 5(4) ODE integrator for pytree states.

`odeint(f, y0, ts)` integrates `dy/dt = f(y, t)` from `t = 0` and returns the
state at each of the non-decreasing times `ts`. Unlike
`jax.experimental.ode.odeint` it steps exactly onto each requested time
(no dense-output interpolation), and it is built from `lax.scan` and
`lax.while_loop` only, so it is jittable and forward-mode differentiable;
reverse-mode differentiation through it is not supported. States are
`tree_math.Vector`s inside: pytree arithmetic reads as vector arithmetic.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tree_math as tm

# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae",
# Table 2 (RK5(4)7M): nodes c, stages a, 5th-order weights b, and the
# difference between the 5th- and 4th-order weights, b - b*.
_C = np.array([0., 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1., 1.])
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0., 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_B = np.array([35 / 384, 0., 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.])
_B_ERR = _B - np.array([5179 / 57600, 0., 7571 / 16695, 393 / 640,
                        -92097 / 339200, 187 / 2100, 1 / 40])


def _axpy(y: tm.Vector, h: jax.Array, coeffs: Any, ks: Any) -> tm.Vector:
  """`y + h Σ_i coeffs_i k_i`."""
  for c, k in zip(coeffs, ks):
    if c != 0.:
      y = y + (h * c).astype(y.dtype) * k
  return y


def _rms(v: tm.Vector) -> jax.Array:
  return jnp.sqrt(tm.numpy.square(v).mean()) if v.size else jnp.zeros(())


def _step(f, y, f0, t, h):
  """One Dormand–Prince step: the new state, its derivative, error estimate."""
  ks = [f0]
  for i in range(1, 7):
    ks.append(f(_axpy(y, h, _A[i], ks), t + _C[i] * h))
  y1 = _axpy(y, h, _A[6], ks[:6])  # The 7th stage is at y1 (FSAL).
  err = _axpy(tm.numpy.zeros_like(y), h, _B_ERR, ks)
  return y1, ks[6], err


def odeint(f: Callable[[Any, jax.Array], Any], y0: Any, ts: jax.Array,
           rtol: float = 1.4e-8, atol: float = 1.4e-8,
           max_steps: int = 100_000) -> Tuple[Any, jax.Array]:
  """Integrates `dy/dt = f(y, t)` from `y(0) = y0` to each time in `ts`.

  Args:
    f: the right-hand side, mapping a state pytree and a scalar time to a
      pytree of the same structure.
    y0: initial state at `t = 0` (a pytree of arrays).
    ts: `(T,)` non-negative, non-decreasing finite times.
    rtol, atol: error tolerances per step (RMS norm, as in
      `jax.experimental.ode`).
    max_steps: cap on the total number of steps.

  Returns:
    `(ys, ok)`: the states stacked along a new leading axis of size `T`, and
    a boolean that is False if `max_steps` was exhausted or a step turned
    non-finite (the states are then unreliable).
  """
  rhs = lambda y, t: tm.Vector(f(y.tree, t))
  y0 = tm.Vector(jax.tree_util.tree_map(jnp.asarray, y0))
  dtype = y0.dtype if jax.tree_util.tree_leaves(y0) else ts.dtype
  ts = ts.astype(dtype)
  t0 = jnp.zeros((), dtype)
  f0 = rhs(y0, t0)

  # Initial step size: Hairer, Nørsett & Wanner, "Solving ODEs I", §II.4.
  scale = atol + rtol * abs(y0)
  d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
  y1 = _axpy(y0, h0, [1.], [f0])
  d2 = _rms((rhs(y1, h0) - f0) / scale) / h0
  h1 = jnp.where(jnp.maximum(d1, d2) <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(d1, d2)) ** (1 / 5))
  h = jnp.minimum(100 * h0, h1).astype(dtype)

  def advance(carry, target):
    def cond(c):
      _, _, t, _, steps, ok = c
      return (t < target) & (steps < max_steps) & ok

    def body(c):
      y, fy, t, h, steps, ok = c
      hh = jnp.minimum(h, target - t)
      last = hh >= target - t
      y_new, f_new, err = _step(rhs, y, fy, t, hh)
      e = _rms(err / (atol + rtol * tm.numpy.maximum(abs(y), abs(y_new))))
      accept = e <= 1
      # Step-size control with safety 0.9, bounded in [0.2, 10]: (1/e)^(1/5).
      factor = jnp.clip(0.9 * jnp.where(e > 0, e, 1e-10) ** (-1 / 5), 0.2, 10.)
      h_next = jnp.where(accept & last, h, hh * factor).astype(dtype)
      t_new = jnp.where(last, target, t + hh)
      pick = lambda a, b: tm.numpy.where(accept, a, b)
      ok = ok & jnp.isfinite(e)
      return (pick(y_new, y), pick(f_new, fy), jnp.where(accept, t_new, t),
              h_next, steps + 1, ok)

    y, fy, t, h, steps, ok = jax.lax.while_loop(cond, body, carry)
    ok = ok & (t >= target)
    return (y, fy, t, h, steps, ok), (y.tree, ok)

  init = (y0, f0, t0, h, jnp.zeros((), jnp.int32), jnp.asarray(True))
  _, (ys, oks) = jax.lax.scan(advance, init, ts)
  return ys, jnp.all(oks)

"""Predictions of infinitely wide networks: GP inference and training dynamics.

Neural Tangents' `nt.predict` API (same names, signatures and defaults), plus
the log marginal likelihood and a matrix-free conjugate-gradient solver for
training sets whose kernel does not fit in memory.

* `gradient_descent_mse`: outputs of one network trained on MSE, any time.
* `gradient_descent`: outputs for any loss, with or without momentum (ODE).
* `gp_inference`: exact NNGP / NTK / NTKGP posterior.
* `gradient_descent_mse_ensemble`: mean and covariance of an infinite
  ensemble, Bayesian (`'nngp'`) or trained (`'ntk'`), any time.
* `max_learning_rate`: largest stable learning rate.
* `marginal_log_likelihood`: evidence of the GP, for model selection.
* `kernel_operator`: a matrix-free kernel for `solver='cg'`.
* `checked`: keeps the input and NaN checks under `jax.jit`.

Eagerly, bad inputs raise errors that name the cause (shapes, NaNs, a kernel
that cannot be factorised: `NotPositiveDefiniteError`); under `jit`, see
`checks`.
"""

import functools as _functools

import jax as _jax

from infwidth.predict.checks import NonFiniteError
from infwidth.predict.checks import NotPositiveDefiniteError
from infwidth.predict.checks import checked
from infwidth.predict.dynamics import ODEState
from infwidth.predict.dynamics import gradient_descent
from infwidth.predict.dynamics import gradient_descent_mse
from infwidth.predict.dynamics import max_learning_rate
from infwidth.predict.ensemble import gradient_descent_mse_ensemble
from infwidth.predict.gp import Gaussian
from infwidth.predict.gp import gp_inference
from infwidth.predict.gp import marginal_log_likelihood
from infwidth.predict.solvers import KernelOperator
from infwidth.predict.solvers import kernel_operator


def _internal_broadcasting(fn):
  """`fn`, and the prediction function it returns, run with implicit rank
  promotion allowed: the solvers broadcast eigenvalues against times and
  targets of other ranks, and must work where the user sets
  `jax_numpy_rank_promotion='raise'` (as NT's tests do)."""
  @_functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with _jax.numpy_rank_promotion('allow'):
      out = fn(*args, **kwargs)
    return _internal_broadcasting(out) if callable(out) and not isinstance(out, type) else out
  return wrapped


gradient_descent = _internal_broadcasting(gradient_descent)
gradient_descent_mse = _internal_broadcasting(gradient_descent_mse)
gradient_descent_mse_ensemble = _internal_broadcasting(gradient_descent_mse_ensemble)
gp_inference = _internal_broadcasting(gp_inference)
marginal_log_likelihood = _internal_broadcasting(marginal_log_likelihood)
max_learning_rate = _internal_broadcasting(max_learning_rate)

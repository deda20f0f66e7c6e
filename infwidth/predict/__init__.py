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

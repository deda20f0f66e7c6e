"""Bad input, as a new user would try it: each case gives the correct value or
an error raised by infwidth (before the computation) that names the problem
and the fix.

One table row per case: `Raises(type, words)` for an error, or a check of
the value (shapes and numbers against closed forms or clean kernels).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw

D = 3
SW, SB = 1.3, 0.4
KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (5, D))


def mlp(params, x):
  """NTK-parameterised ReLU MLP: `[(w, b), ...]`, weights N(0, 1)."""
  for w, b in params[:-1]:
    x = jax.nn.relu(SW / np.sqrt(w.shape[0]) * (x @ w) + SB * b)
  w, b = params[-1]
  return SW / np.sqrt(w.shape[0]) * (x @ w) + SB * b


def init_mlp(key, widths: Sequence[int], bias_scale=1.0):
  params = []
  for a, b in zip(widths[:-1], widths[1:]):
    key, kw, kb = jax.random.split(key, 3)
    params.append((jax.random.normal(kw, (a, b)), bias_scale * jax.random.normal(kb, (b,))))
  return params


def unit_stats(params):
  """Exact moments N(0, 1) for every leaf."""
  return jax.tree_util.tree_map(lambda _: iw.ParamStats(0.0, 1.0), params)


def relu_pair(k11, k22, k12):
  """E[relu(u) relu(v)] and P(u > 0, v > 0) for centred (u, v) (Cho & Saul)."""
  c = np.clip(k12 / np.sqrt(k11 * k22), -1, 1)
  t = np.arccos(c)
  return (np.sqrt(k11 * k22) * (np.sin(t) + (np.pi - t) * c) / (2 * np.pi),
          (np.pi - t) / (2 * np.pi))


@dataclasses.dataclass
class Raises:
  """The case raises `exc` (or warns, for a Warning class) with all `words` in its message."""
  exc: type
  words: Sequence[str]


# ----------------------------------------------------------------------------
# Cases: each returns the value to check (or raises).


def zero_hidden_weight():
  # A legal, degenerate network: the second layer's weight is all zeros, so
  # its pre-activation is its bias alone (the same for every input).
  params = init_mlp(KEY, (D, 64, 64, 1))
  params[1] = (jnp.zeros_like(params[1][0]), params[1][1])
  stats = unit_stats(params)
  stats[1] = (None, stats[1][1])            # the zero weight's moments: estimated (0)
  return iw.kernelize(mlp, params, param_stats=stats)(X, None, ('nngp', 'ntk'))


def check_zero_hidden_weight(k):
  # Layer 1: K0 = SW²/D x·x' + SB²; layer 2's pre-activation is SB·b1, the same
  # N(0, SB²) variable for every input: E[relu²] = SB²/2, P(> 0) = 1/2.
  # NNGP = SW²·SB²/2 + SB².
  # NTK = SW²·SB²/2 (W2) + SW²·½·Θ2 + SB² (b2), Θ2 = SW²·E[relu(h1) relu(h1')] (W1) + SB² (b1).
  x = np.asarray(X)
  k0 = SW ** 2 / D * x @ x.T + SB ** 2
  d = np.diag(k0)
  e1, _ = relu_pair(d[:, None], d[None], k0)
  nngp = SW ** 2 * SB ** 2 / 2 + SB ** 2
  ntk = SW ** 2 * SB ** 2 / 2 + SW ** 2 / 2 * (SW ** 2 * e1 + SB ** 2) + SB ** 2
  assert k.nngp.shape == k.ntk.shape == (5, 5)
  np.testing.assert_allclose(k.nngp, np.full((5, 5), nngp), rtol=1e-12)
  np.testing.assert_allclose(k.ntk, ntk, rtol=1e-12)


def empty_x2():
  params = init_mlp(KEY, (D, 64, 1))
  kf = iw.kernelize(mlp, params, param_stats=unit_stats(params))
  full = kf(X, None, None)
  empty = kf(X, X[:0], None)
  return full, empty, kf(X[:0], X, 'ntk'), jax.jit(kf, static_argnames='get')(X, X[:0], 'nngp')


def check_empty_x2(out):
  full, k, k_rows, k_jit = out
  assert k.nngp.shape == k.ntk.shape == k_jit.shape == (5, 0)
  assert k_rows.shape == (0, 5)
  assert k.cov2.shape == (0,) and k.shape2 == (0, 1) and k.shape1 == (5, 1)
  np.testing.assert_allclose(k.cov1, full.cov1, rtol=1e-12)


def nan_input_under_jit():
  params = init_mlp(KEY, (D, 128, 128, 1), bias_scale=0.3)   # sampled biases
  kf = jax.jit(iw.kernelize(mlp, params), static_argnames='get')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')                          # estimated moments
    clean = kf(X, None, 'nngp')
    bad = kf(X.at[2, 1].set(jnp.nan), None, 'nngp')
  return np.asarray(clean), np.asarray(bad)


def check_nan_input_under_jit(out):
  clean, bad = out
  nan = np.zeros(bad.shape, bool)
  nan[2] = nan[:, 2] = True
  assert np.isnan(bad[nan]).all()                  # that input's row and column
  np.testing.assert_allclose(bad[~nan], clean[~nan], rtol=1e-12)
  assert np.isfinite(clean).all()


def nan_in_parameter():
  params = init_mlp(KEY, (D, 64, 1))
  params[1] = (params[1][0].at[7, 0].set(jnp.nan), params[1][1])
  return iw.kernelize(mlp, params)


def inf_in_parameter():
  params = init_mlp(KEY, (D, 64, 1))
  params[0] = (params[0][0], params[0][1].at[3].set(-jnp.inf))
  return iw.kernelize(mlp, params)


def nan_in_param_stats():
  params = init_mlp(KEY, (D, 64, 1))
  stats = unit_stats(params)
  stats[0] = (stats[0][0], iw.ParamStats(0.0, float('nan')))
  return iw.kernelize(mlp, params, param_stats=stats)


def traced_parameters():
  # Moments estimated in the trace: the eager kernel, to rounding.
  params = init_mlp(KEY, (D, 64, 1))
  traced = jax.jit(lambda p: iw.kernelize(mlp, p)(X, None, 'nngp'))(params)
  return traced, iw.kernelize(mlp, params)(X, None, 'nngp')


def check_traced_parameters(out):
  traced, eager = out
  np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-9)


def traced_parameters_with_stats():
  # Moments given for every leaf: nothing is read from the traced values, and
  # a NaN in them (under jit) changes nothing.
  params = init_mlp(KEY, (D, 64, 1))
  stats = unit_stats(params)
  run = jax.jit(lambda p: iw.kernelize(mlp, p, param_stats=stats)(X, None, 'nngp'))
  nan_params = [(w.at[0, 0].set(jnp.nan), b) for w, b in params]
  return run(params), run(nan_params), iw.kernelize(mlp, params, param_stats=stats)(X, None, 'nngp')


def check_traced_parameters_with_stats(out):
  a, b, eager = out
  np.testing.assert_allclose(a, eager, rtol=1e-12)
  np.testing.assert_allclose(b, eager, rtol=1e-12)


def param_stats_wrong_structure():
  params = {'dense0': {'w': jnp.ones((D, 8)), 'b': jnp.zeros(8)}, 'out': {'w': jnp.ones((8, 1))}}
  stats = [iw.ParamStats(0.0, 1.0)] * 3     # a list where params is a dict
  return iw.kernelize(lambda p, x: x, params, param_stats=stats)


def output_without_parameters():
  params = init_mlp(KEY, (D, 64, 1))
  two = lambda p, x: {'logits': mlp(p, x), 'aux': jnp.sum(x ** 2, -1, keepdims=True)}
  return iw.kernelize(two, params, param_stats=unit_stats(params))(X, None, 'nngp')


def fallback_kernel_shapes():
  params = init_mlp(KEY, (D, 64, 2))
  net = lambda p, x: jnp.sort(mlp(p, x), axis=-1)         # no rule for sort
  kf = iw.kernelize(net, params, param_stats=unit_stats(params), fallback='empirical')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return kf(X, X[:3], None)


def check_fallback_kernel_shapes(k):
  assert k.shape1 == (5, 2) and k.shape2 == (3, 2)       # the output's, not the input's
  assert k.nngp.shape == (5, 3)


def _indefinite(lowest=-0.3):
  """A symmetric 6x6 kernel whose smallest eigenvalue is `lowest`."""
  a = np.random.RandomState(0).randn(6, 6)
  k = a @ a.T
  return k - (np.linalg.eigvalsh(k)[0] - lowest) * np.eye(6)


Y6 = np.random.RandomState(1).randn(6, 1)


def mse_indefinite():
  return iw.predict.gradient_descent_mse(_indefinite(), Y6)(t=1.0, fx_train_0=0.)


def mse_asymmetric():
  k = _indefinite(0.5)
  k[0, 3] += 1.0
  return iw.predict.gradient_descent_mse(k, Y6)(t=1.0, fx_train_0=0.)


def ensemble_indefinite():
  k = _indefinite()
  kernel_fn = lambda x1, x2, get, **kw: k if x2 is None else k[:2]
  predict_fn = iw.predict.gradient_descent_mse_ensemble(kernel_fn, np.zeros((6, 1)), Y6)
  return predict_fn(t=1.0, x_test=np.zeros((2, 1)), get='ntk')


def ensemble_diag_reg_suffices():
  # The diag_reg the error suggests makes the same kernel work.
  k = _indefinite()
  kernel_fn = lambda x1, x2, get, **kw: k if x2 is None else k[:2]
  with pytest.raises(iw.predict.NotPositiveDefiniteError) as info:
    iw.predict.gradient_descent_mse_ensemble(kernel_fn, np.zeros((6, 1)), Y6)(
        t=1.0, x_test=np.zeros((2, 1)), get='ntk')
  reg = float(re.search(r'diag_reg=([0-9.e-]+) or more', str(info.value)).group(1))
  return iw.predict.gradient_descent_mse_ensemble(kernel_fn, np.zeros((6, 1)), Y6,
                                                  diag_reg=reg)(t=1.0, x_test=np.zeros((2, 1)),
                                                                get='ntk')


def check_finite_prediction(out):
  assert out.shape == (2, 1) and np.isfinite(out).all()


def max_learning_rate_indefinite():
  return iw.predict.max_learning_rate(_indefinite())


def _wide_mlp():
  params = init_mlp(KEY, (784, 64, 64, 10))
  return iw.kernelize(mlp, params, param_stats=unit_stats(params))


def kernel_larger_than_memory():
  # 200 000 inputs: the results alone take 596 GiB in float64. Raised while
  # tracing (as under jit), before anything is computed.
  kf = _wide_mlp()
  return jax.eval_shape(lambda x: kf(x, None, ('nngp', 'ntk')),
                        jax.ShapeDtypeStruct((200_000, 784), jnp.float64))


def kernel_larger_than_a_limit(monkeypatch_limit=48 * 2 ** 20):
  """1024 inputs under a 48 MiB limit: the suggested batch size works."""
  from infwidth.interpreters import memory
  kf = _wide_mlp()
  x = jax.random.normal(KEY, (1024, 784))
  old = memory.LIMIT_BYTES
  memory.LIMIT_BYTES = monkeypatch_limit
  try:
    with pytest.raises(memory.KernelMemoryError) as info:
      kf(x, None, ('nngp', 'ntk'))
    msg = str(info.value)
    b = int(re.search(r'batch_size=(\d+)', msg).group(1))
    tiled = iw.batch(kf, batch_size=b)(x, None, 'nngp')
  finally:
    memory.LIMIT_BYTES = old
  return msg, b, tiled, kf(x[:40], x[-24:], 'nngp')


def check_kernel_larger_than_a_limit(out):
  msg, b, tiled, corner = out
  assert 'infwidth.batch(kernel_fn, batch_size=' in msg and '1024 x 1024' in msg
  assert 8 <= b < 1024
  assert tiled.shape == (1024, 1024)
  np.testing.assert_allclose(tiled[:40, -24:], corner, rtol=1e-12)


def diagonal_flags_of_stax():
  """NT's layouts: `diagonal_batch` keeps only the variances in `cov1`."""
  _, _, kf = iw.stax.serial(iw.stax.Dense(8, W_std=SW, b_std=SB), iw.stax.Relu(),
                            iw.stax.Dense(1, W_std=SW, b_std=SB))
  return (kf(X, None, ('nngp', 'cov1'), diagonal_batch=True),
          kf(X, None, ('nngp', 'cov1'), diagonal_batch=False))


def check_diagonal_flags_of_stax(out):
  diag, full = out
  assert diag.nngp.shape == full.nngp.shape == (5, 5)
  assert diag.cov1.shape == (5,) and full.cov1.shape == (5, 5)
  np.testing.assert_allclose(diag.cov1, np.diagonal(full.cov1), rtol=1e-12)
  np.testing.assert_allclose(diag.nngp, full.nngp, rtol=1e-12)


def integer_inputs_to_an_embedding():
  """Token ids stay integer; a row of i.i.d. entries is a source per token."""
  ids = jnp.array([[0, 3], [3, 1], [2, 2]])
  table = jax.random.normal(KEY, (4, 16))
  f = lambda p, t: p[t].mean(1) * SW
  return ids, iw.kernelize(f, table, param_stats=iw.ParamStats(0.0, 1.0))(ids, None, 'nngp')


def check_integer_inputs_to_an_embedding(out):
  ids, k = out
  ids = np.asarray(ids)
  same = (ids[:, None, :, None] == ids[None, :, None, :]).mean((2, 3))
  np.testing.assert_allclose(k, SW ** 2 * same, rtol=1e-12)


def a_noisy_bias_with_a_large_effect():
  """A 1024-entry bias (±4.4% on its variance) moves the kernel by percents."""
  w0, b0 = jax.random.normal(KEY, (D, 1024)), jax.random.normal(jax.random.PRNGKey(6), (1024,))
  w1 = jax.random.normal(jax.random.PRNGKey(7), (1024, 128))
  f = lambda p, x: jax.nn.relu(x @ p[0] / np.sqrt(D) + p[1]) @ p[2] / np.sqrt(1024)
  stats = (iw.ParamStats(0.0, 1.0), None, iw.ParamStats(0.0, 1.0))
  with warnings.catch_warnings():
    warnings.simplefilter('always')
    iw.kernelize(f, (w0, b0, w1), param_stats=stats)(X, None, 'nngp')


@dataclasses.dataclass
class Case:
  name: str
  run: Callable
  expect: object   # Raises(...) or a check of the value


CASES = [
    Case('all-zero hidden weight', zero_hidden_weight, check_zero_hidden_weight),
    Case('empty x2', empty_x2, check_empty_x2),
    Case('NaN input under jit', nan_input_under_jit, check_nan_input_under_jit),
    Case('NaN in a parameter', nan_in_parameter,
         Raises(iw.InfwidthError, [r"\[1\]\[0\]", 'NaN or inf', r'index \(7, 0\)',
                                   'param_stats'])),
    Case('inf in a parameter', inf_in_parameter,
         Raises(iw.InfwidthError, [r"\[0\]\[1\]", 'NaN or inf', r'index \(3,\)'])),
    Case('NaN in param_stats', nan_in_param_stats,
         Raises(iw.InfwidthError, [r"param_stats for \[0\]\[1\]", 'var=nan', 'finite'])),
    Case('parameters traced by jit', traced_parameters, check_traced_parameters),
    Case('traced parameters with param_stats', traced_parameters_with_stats,
         check_traced_parameters_with_stats),
    Case('param_stats of the wrong structure', param_stats_wrong_structure,
         Raises(iw.InfwidthError, ['structure of params', r"expected: \{'dense0'",
                                   r'\(3, 8\)', r'got: +\[ParamStats, ParamStats',
                                   'Expected dict'])),
    Case('an output that no parameter reaches', output_without_parameters,
         Raises(iw.InfwidthError, [r"output \['aux'\]", 'does not depend on any parameter',
                                   'return only the outputs'])),
    Case('get=None from the fallback', fallback_kernel_shapes, check_fallback_kernel_shapes),
    Case('gradient_descent_mse of an indefinite kernel', mse_indefinite,
         Raises(iw.predict.NotPositiveDefiniteError,
                ['not positive semi-definite', 'smallest eigenvalue', '-0.3', 'diag_reg='])),
    Case('gradient_descent_mse of an asymmetric kernel', mse_asymmetric,
         Raises(iw.predict.NotPositiveDefiniteError,
                ['not symmetric', r'\(0, 3\) and \(3, 0\)', 'differ by 1'])),
    Case('gradient_descent_mse_ensemble of an indefinite kernel', ensemble_indefinite,
         Raises(iw.predict.NotPositiveDefiniteError,
                [r"kernel_fn\(x_train, None, 'ntk'\)", 'smallest eigenvalue', '-0.3',
                 'diag_reg='])),
    Case('the suggested diag_reg works', ensemble_diag_reg_suffices, check_finite_prediction),
    Case('max_learning_rate of an indefinite kernel', max_learning_rate_indefinite,
         Raises(iw.predict.NotPositiveDefiniteError,
                ['not positive semi-definite', '-0.3', 'No learning rate'])),
    Case('a kernel larger than memory', kernel_larger_than_memory,
         Raises(iw.InfwidthError, ['200000 x 200000', 'GiB', 'results alone do not fit',
                                   r'infwidth.batch\(kernel_fn, batch_size=\d+\)'])),
    Case('a kernel larger than a memory limit', kernel_larger_than_a_limit,
         check_kernel_larger_than_a_limit),
    Case('diagonal_batch passed to a stax kernel_fn', diagonal_flags_of_stax,
         check_diagonal_flags_of_stax),
    Case('integer inputs to an embedding', integer_inputs_to_an_embedding,
         check_integer_inputs_to_an_embedding),
    Case('estimated moments of a 1024-entry bias', a_noisy_bias_with_a_large_effect,
         Raises(UserWarning, ['estimated from small samples', r'\[1\]', '1024 entries',
                              'param_stats'])),
]


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case):
  if isinstance(case.expect, Raises):
    if issubclass(case.expect.exc, Warning):
      with pytest.warns(case.expect.exc) as rec:
        case.run()
      msg = ' '.join(str(w.message) for w in rec if issubclass(w.category, case.expect.exc))
    else:
      with pytest.raises(case.expect.exc) as info:
        case.run()
      msg = str(info.value)
    for word in case.expect.words:
      assert re.search(word, msg), f'{word!r} not in: {msg}'
  else:
    case.expect(case.run())

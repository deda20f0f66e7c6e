"""`kernelize(apply_fn)` as a transform: `kernel_fn(params, x1, x2, get)`.

The transform form must give the bound form's kernels (the same function of
the same parameters), compose with `jax.jit` with `get` static, take options
as keywords and work as a decorator.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw

D, W, C = 4, 256, 3
X1 = jax.random.normal(jax.random.PRNGKey(0), (5, D))
X2 = jax.random.normal(jax.random.PRNGKey(1), (3, D))
pytestmark = pytest.mark.filterwarnings('ignore:parameter moments estimated')


def mlp(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def _params(key=jax.random.PRNGKey(2), bias_std=0.1):
  keys = jax.random.split(key, 6)
  shapes = [(D, W), (W, W), (W, C)]
  return [(jax.random.normal(keys[2 * i], s) / np.sqrt(s[0]),
           bias_std * jax.random.normal(keys[2 * i + 1], (s[1],)))
          for i, s in enumerate(shapes)]


@pytest.mark.parametrize('x2', [None, X2], ids=['x1_is_x2', 'x1_x2'])
def test_transform_equals_bound_form(x2):
  params = _params()
  bound = iw.kernelize(mlp, params)(X1, x2, ('nngp', 'ntk'))
  transform = iw.kernelize(mlp)(params, X1, x2, ('nngp', 'ntk'))
  # The bound form compiles its eager calls, the transform evaluates them op
  # by op: equal to rounding.
  np.testing.assert_allclose(transform.nngp, bound.nngp, rtol=1e-13)
  np.testing.assert_allclose(transform.ntk, bound.ntk, rtol=1e-13)


@pytest.mark.parametrize('bias_std', [0.1, 0.0], ids=['biases', 'zero_biases'])
def test_transform_under_jit(bias_std):
  """Under jit the parameters are traced, so their moments are computed in the
  trace; the kernels equal the eager ones to rounding."""
  params = _params(bias_std=bias_std)
  eager = iw.kernelize(mlp, params)(X1, X2, ('nngp', 'ntk'))
  kernel_fn = jax.jit(iw.kernelize(mlp), static_argnames='get')
  jitted = kernel_fn(params, X1, X2, ('nngp', 'ntk'))
  np.testing.assert_allclose(jitted.nngp, eager.nngp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jitted.ntk, eager.ntk, rtol=1e-5, atol=1e-7)
  # New parameters, same compiled function: the kernel follows them.
  other = jax.tree.map(lambda a: 2.0 * a, params)
  want = iw.kernelize(mlp, other)(X1, X2, 'nngp')
  np.testing.assert_allclose(kernel_fn(other, X1, X2, 'nngp'), want, rtol=1e-5, atol=1e-7)


def test_decorator_with_options():
  params = _params()
  stats = jax.tree.map(lambda a: iw.ParamStats(0.0, 1.0 / a.shape[0]) if a.ndim == 2
                       else iw.ParamStats(0.0, 0.01), params)

  @iw.kernelize(param_stats=stats)
  def kernel_fn(p, x):
    return mlp(p, x)

  want = iw.kernelize(mlp, params, param_stats=stats)(X1, None, 'ntk')
  np.testing.assert_allclose(kernel_fn(params, X1, None, 'ntk'), want, rtol=1e-13)
  # Plain decorator: same as the transform of the function.
  decorated = iw.kernelize(mlp)
  np.testing.assert_allclose(decorated(params, X1, get='nngp'),
                             iw.kernelize(mlp, params)(X1, None, 'nngp'), rtol=1e-13)


def test_transform_of_a_flax_apply():
  nn = pytest.importorskip('flax.linen')

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(W)(x))
      return nn.Dense(C)(x)

  model = MLP()
  params = model.init(jax.random.PRNGKey(3), X1)
  kernel_fn = jax.jit(iw.kernelize(model.apply), static_argnames='get')
  k = kernel_fn(params, X1, X2, 'nngp')
  np.testing.assert_allclose(k, iw.kernelize(model.apply, params)(X1, X2, 'nngp'),
                             rtol=1e-5, atol=1e-7)


def test_bad_first_argument():
  with pytest.raises(iw.InfwidthError, match='function first'):
    iw.kernelize(_params(), mlp)

"""kernelize on one architecture written in plain JAX, Flax (linen, nnx), Haiku
and Equinox; per-leaf NTK weights; abstract (ShapeDtypeStruct) parameters.

The architecture: Dense(D→N)-relu-Dense(N→N)-relu-Dense(N→C), with biases, in
standard parameterisation (the frameworks' own Dense layers). One set of float64
arrays is copied into every framework's parameter structure, so every version
computes the same function with the same parameter moments and the kernels
must agree to round-off (1e-10).
"""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infwidth as iw

D, N, C = 5, 256, 3
SW, SB = 1.3, 0.4

# Leaves with fewer than ~800 entries warn about their estimated variance;
# these tests compare frameworks at equal moments, so the warning is expected.
pytestmark = pytest.mark.filterwarnings('ignore:parameter moments estimated')


def _arrays(key=jax.random.PRNGKey(0)):
  """[(W (in, out), b (out,))] with W ~ N(0, σ²/fan_in), b ~ N(0, σ_b²)."""
  dims = [D, N, N, C]
  out = []
  for a, b in zip(dims[:-1], dims[1:]):
    k1, k2, key = jax.random.split(key, 3)
    out.append((SW / np.sqrt(a) * jax.random.normal(k1, (a, b)),
                SB * jax.random.normal(k2, (b,))))
  return out


ARRAYS = _arrays()
X1 = jax.random.normal(jax.random.PRNGKey(1), (4, D))
X2 = jax.random.normal(jax.random.PRNGKey(2), (3, D))


def plain_apply(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.Dense(N)(x))
    x = jax.nn.relu(nn.Dense(N)(x))
    return nn.Dense(C)(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.l0 = nnx.Linear(D, N, rngs=rngs)
    self.l1 = nnx.Linear(N, N, rngs=rngs)
    self.l2 = nnx.Linear(N, C, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(jax.nn.relu(self.l0(x)))))


def _haiku_forward(x):
  return hk.nets.MLP([N, N, C], activation=jax.nn.relu)(x)


def build_plain(arrays):
  return plain_apply, [tuple(l) for l in arrays]


def build_linen(arrays):
  model = LinenMLP()
  variables = model.init(jax.random.PRNGKey(0), X1)
  if arrays is not None:
    variables = {'params': {f'Dense_{i}': {'kernel': w, 'bias': b}
                            for i, (w, b) in enumerate(arrays)}}
  return model.apply, variables


def build_nnx(arrays):
  model = NnxMLP(nnx.Rngs(0))
  if arrays is not None:
    for layer, (w, b) in zip((model.l0, model.l1, model.l2), arrays):
      layer.kernel.value = w
      layer.bias.value = b
  graphdef, state = nnx.split(model)

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  return apply, state


def build_haiku(arrays):
  t = hk.without_apply_rng(hk.transform(_haiku_forward))
  params = t.init(jax.random.PRNGKey(0), X1)
  if arrays is not None:
    params = {f'mlp/~/linear_{i}': {'w': w, 'b': b} for i, (w, b) in enumerate(arrays)}
  return t.apply, params


def build_equinox(arrays):
  model = eqx.nn.MLP(D, C, N, depth=2, activation=jax.nn.relu, key=jax.random.PRNGKey(0))
  if arrays is not None:
    # Equinox's Linear stores its weight as (out, in).
    for i, (w, b) in enumerate(arrays):
      model = eqx.tree_at(lambda m: (m.layers[i].weight, m.layers[i].bias), model, (w.T, b))
  params, static = eqx.partition(model, eqx.is_array)

  def apply(params, x):
    return jax.vmap(eqx.combine(params, static))(x)   # the model is per-example

  return apply, params


BUILDERS = {'plain': build_plain, 'linen': build_linen, 'nnx': build_nnx,
            'haiku': build_haiku, 'equinox': build_equinox}


def _kernels(name, x1=X1, x2=X2):
  apply, params = BUILDERS[name](ARRAYS)
  return iw.kernelize(apply, params)(x1, x2, ('nngp', 'ntk'))


REFERENCE = {}


def _reference():
  if not REFERENCE:
    REFERENCE['k'] = _kernels('plain')
  return REFERENCE['k']


@pytest.mark.parametrize('name', ['linen', 'nnx', 'haiku', 'equinox'])
def test_same_parameters_same_kernel(name):
  apply, params = BUILDERS[name](ARRAYS)
  # The framework computes the same function as the plain version.
  np.testing.assert_allclose(apply(params, X1), plain_apply(ARRAYS, X1), rtol=1e-12, atol=1e-12)
  ref = _reference()
  k = iw.kernelize(apply, params)(X1, X2, ('nngp', 'ntk'))
  assert k.nngp.shape == k.ntk.shape == (4, 3)
  # Identical arithmetic up to summation order: 1e-10 relative.
  np.testing.assert_allclose(k.nngp, ref.nngp, rtol=1e-10)
  np.testing.assert_allclose(k.ntk, ref.ntk, rtol=1e-10)


@pytest.mark.parametrize('name', ['linen', 'haiku'])
def test_default_init_runs_and_is_psd(name):
  # Default inits differ between frameworks (variance-corrected truncated
  # normal in Flax, uncorrected in Haiku; zero biases): no equality here.
  apply, params = BUILDERS[name](None)
  k = iw.kernelize(apply, params)(X1)
  for m in (k.nngp, k.ntk):
    m = np.asarray(m)
    assert m.shape == (4, 4) and np.all(np.isfinite(m))
    np.testing.assert_allclose(m, m.T, rtol=1e-12)
    ev = np.linalg.eigvalsh(m)
    assert ev.min() >= -1e-10 * ev.max() and ev.max() > 0


# ----------------------------------------------------------------------------
# ntk_weights and abstract parameters, against the NTK-parameterisation recursion.


def ntk_mlp(p, x):
  (w0, b0), (w1, b1) = p
  h = jax.nn.relu(SW / np.sqrt(D) * (x @ w0) + SB * b0)
  return SW / np.sqrt(N) * (h @ w1) + SB * b1


NTK_PARAMS = [(jax.random.normal(jax.random.PRNGKey(5), (D, N)), jnp.zeros(N)),
              (jax.random.normal(jax.random.PRNGKey(6), (N, C)), jnp.zeros(C))]
UNIT = [(iw.ParamStats(0.0, 1.0), iw.ParamStats(0.0, 1.0))] * 2


def _terms(x1, x2):
  """Each leaf's NTK term of `ntk_mlp` (NT's Table 1 split by parameter)."""
  x1, x2 = np.asarray(x1), np.asarray(x2)
  lin = lambda a, b: SW ** 2 * a @ b.T / D + SB ** 2
  k12, k11, k22 = lin(x1, x2), np.diag(lin(x1, x1))[:, None], np.diag(lin(x2, x2))[None, :]
  norm = np.sqrt(k11 * k22)
  th = np.arccos(np.clip(k12 / norm, -1, 1))
  t = norm * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
  tdot = (np.pi - th) / (2 * np.pi)
  return {'w0': SW ** 2 * tdot * (SW ** 2 * (x1 @ x2.T) / D), 'b0': SW ** 2 * tdot * SB ** 2,
          'w1': SW ** 2 * t, 'b1': SB ** 2 * np.ones_like(t)}


LEAVES = ['w0', 'b0', 'w1', 'b1']


@pytest.mark.parametrize('leaf', LEAVES)
@pytest.mark.parametrize('weight', [0.0, 2.5])
def test_ntk_weights_scale_one_leaf(leaf, weight):
  ws = {l: (weight if l == leaf else 1.0) for l in LEAVES}
  tree = [(ws['w0'], ws['b0']), (ws['w1'], ws['b1'])]
  k = iw.kernelize(ntk_mlp, NTK_PARAMS, param_stats=UNIT, ntk_weights=tree)(X1, X2, ('nngp', 'ntk'))
  terms = _terms(X1, X2)
  want = sum(ws[l] * terms[l] for l in LEAVES)
  np.testing.assert_allclose(k.ntk, want, rtol=1e-10, atol=1e-12)
  # The NNGP does not depend on learning rates.
  np.testing.assert_allclose(k.nngp, terms['w1'] + terms['b1'], rtol=1e-10)
  # The leaf's term is not negligible, so the check is not vacuous.
  assert np.abs(terms[leaf]).max() > 0.02 * np.abs(want).max()


def test_ntk_weight_zero_matches_frozen_empirical_ntk():
  # Freezing b1 and W0 in finite networks removes the same terms: average the
  # empirical NTK with those leaves frozen over draws (width N, 32 draws) and
  # compare within 4 SE + the O(1/n) width term (DESIGN §6).
  tree = [(0.0, 1.0), (1.0, 0.0)]
  k = iw.kernelize(ntk_mlp, NTK_PARAMS, param_stats=UNIT, ntk_weights=tree)(X1, None, 'ntk')

  @jax.jit
  def one(key):
    ks = jax.random.split(key, 4)
    p = [(jax.random.normal(ks[0], (D, N)), jax.random.normal(ks[1], (N,))),
         (jax.random.normal(ks[2], (N, C)), jax.random.normal(ks[3], (C,)))]
    return iw.empirical.empirical_kernels(ntk_mlp, p, X1, None, 'ntk', tree)

  draws = np.stack([one(k_) for k_ in jax.random.split(jax.random.PRNGKey(7), 32)])
  mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
  tol = 4 * se + 2.0 / N * np.abs(k).max()
  assert np.all(np.abs(mean - k) <= tol)
  full = iw.kernelize(ntk_mlp, NTK_PARAMS, param_stats=UNIT)(X1, None, 'ntk')
  assert np.all(np.abs(full - k) > tol)    # the frozen leaves' terms are detectable


def test_shape_dtype_struct_params():
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), NTK_PARAMS)
  ka = iw.kernelize(ntk_mlp, abstract, param_stats=UNIT)(X1, X2)
  kc = iw.kernelize(ntk_mlp, NTK_PARAMS, param_stats=UNIT)(X1, X2)
  for f in ('nngp', 'ntk', 'cov1', 'cov2'):
    np.testing.assert_allclose(getattr(ka, f), getattr(kc, f), rtol=1e-14)
  terms = _terms(X1, X2)
  np.testing.assert_allclose(ka.ntk, sum(terms.values()), rtol=1e-10)

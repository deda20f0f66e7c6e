"""kernelize's errors, warnings and fallbacks on dense networks.

Unsupported primitives raise `infwidth.UnsupportedPrimitiveError` naming the
primitive and the user's line; `fallback='monte_carlo'` and
`fallback='empirical'` warn and return the documented estimates; estimated
parameter moments warn when noisy; bad input raises `infwidth.InfwidthError`.
"""

import importlib.util
import inspect
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth.empirical import empirical_kernels

D, N, C = 6, 128, 32
SW = 1.4
THIS_FILE = os.path.basename(__file__)

X = jax.random.normal(jax.random.PRNGKey(0), (4, D))
UNIT = {'w0': iw.ParamStats(0.0, 1.0), 'w1': iw.ParamStats(0.0, 1.0)}


def _params(key=jax.random.PRNGKey(1), n=N, c=C):
  k0, k1 = jax.random.split(key)
  return {'w0': jax.random.normal(k0, (D, n)), 'w1': jax.random.normal(k1, (n, c))}


def make_net(op=lambda h: h):
  """relu MLP with `op` applied to the hidden layer (NTK parameterisation)."""
  def net(p, x):
    h = jax.nn.relu(SW / np.sqrt(D) * (x @ p['w0']))
    h = op(h)
    return SW / np.sqrt(h.shape[-1]) * (h @ p['w1'])
  return net


def sort_features(h):
  return jnp.sort(h, axis=-1)


def max_features(h):
  return h * jnp.max(h, axis=-1, keepdims=True)


def cumsum_size_one(h):
  # The identity, written with a primitive that has no kernel rule.
  return jnp.cumsum(h[..., None], axis=-1)[..., 0]


def _line_of(fn, text):
  lines, start = inspect.getsourcelines(fn)
  return start + next(i for i, l in enumerate(lines) if text in l)


@pytest.mark.parametrize('op, prim, text', [
    (sort_features, 'sort', 'jnp.sort'),
    (max_features, 'reduce_max', 'jnp.max'),
])
def test_unsupported_primitive_names_primitive_and_user_line(op, prim, text):
  kf = iw.kernelize(make_net(op), _params(), param_stats=UNIT)
  with pytest.raises(iw.UnsupportedPrimitiveError) as info:
    kf(X, None, 'nngp')
  err = info.value
  assert isinstance(err, iw.InfwidthError)
  assert str(err.primitive) == prim
  msg = str(err)
  assert f'`{prim}`' in msg
  assert f'{THIS_FILE}:{_line_of(op, text)}' in msg
  assert 'fallback' in msg


def test_unsupported_primitive_also_under_jit():
  kf = jax.jit(iw.kernelize(make_net(sort_features), _params(), param_stats=UNIT),
               static_argnames='get')
  with pytest.raises(iw.UnsupportedPrimitiveError, match='sort'):
    kf(X, None, 'ntk')


def test_monte_carlo_fallback_estimates_the_analytic_kernel():
  # `cumsum` over a size-1 axis is the identity but has no rule: the fallback
  # must estimate the kernel of the same network without it. Width 512 and 128
  # logits keep the 64-draw standard error near 2 %.
  n, c = 512, 128
  params = _params(n=n, c=c)
  with pytest.raises(iw.UnsupportedPrimitiveError):
    iw.kernelize(make_net(cumsum_size_one), params, param_stats=UNIT)(X, None, 'nngp')
  exact = iw.kernelize(make_net(), params, param_stats=UNIT)(X, None, ('nngp', 'ntk'))
  kf = iw.kernelize(make_net(cumsum_size_one), params, param_stats=UNIT,
                    fallback='monte_carlo', n_samples=64, key=jax.random.PRNGKey(3))
  with pytest.warns(UserWarning, match='cumsum'):
    est = kf(X, None, ('nngp', 'ntk'))
  # Tolerance: 4·SE of a 64-draw mean, the per-draw spread estimated from our
  # own 32 draws of the same finite network (same width, same Gaussian
  # moments), plus 2/n·scale for the finite-width bias (one hidden layer: the
  # mean kernel is exact, so this is slack).
  net = jax.jit(lambda p: empirical_kernels(make_net(), p, X, None, ('nngp', 'ntk')))
  draws = [net(_params(k, n, c)) for k in jax.random.split(jax.random.PRNGKey(4), 32)]
  for name in ('nngp', 'ntk'):
    d = np.stack([getattr(k, name) for k in draws])
    se = d.std(0, ddof=1) / np.sqrt(64)
    a = np.asarray(getattr(exact, name))
    tol = 4 * se + 2.0 / n * np.abs(a).max()
    assert np.all(np.abs(np.asarray(getattr(est, name)) - a) <= tol), name
    assert np.all(tol.diagonal() < 0.15 * a.diagonal())       # non-vacuous
    # An estimate, not the kernel of the given draw nor an exact copy.
    assert not np.allclose(getattr(est, name), a, rtol=1e-8)


def test_empirical_fallback_is_empirical_kernels_at_params():
  params = _params()
  kf = iw.kernelize(make_net(cumsum_size_one), params, param_stats=UNIT, fallback='empirical')
  x2 = X[:3] + 0.5
  with pytest.warns(UserWarning, match='cumsum'):
    k = kf(X, x2, ('nngp', 'ntk'))
  want = empirical_kernels(make_net(cumsum_size_one), params, X, x2, ('nngp', 'ntk'))
  np.testing.assert_allclose(k.nngp, want.nngp, rtol=1e-10)
  np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-10)
  # ...which is the empirical kernel of the network without the identity op.
  plain = empirical_kernels(make_net(), params, X, x2, ('nngp', 'ntk'))
  np.testing.assert_allclose(k.ntk, plain.ntk, rtol=1e-10)


# ----------------------------------------------------------------------------
# The sampling-error warning.


def _warnings_of(fn):
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    fn()
  return [str(w.message) for w in rec if 'estimated from small samples' in str(w.message)]


def _biased_net(p, x):
  h = jax.nn.relu(x @ p['w0'] / np.sqrt(D) + p['b0'])
  return h @ p['w1'] / np.sqrt(p['w1'].shape[0])


def test_sampling_error_warning_names_the_noisy_leaves():
  params = {'w0': jax.random.normal(jax.random.PRNGKey(5), (D, 256)),   # 1536 entries, ±3.6 %
            'b0': jax.random.normal(jax.random.PRNGKey(6), (256,)),     # 256 entries, ±8.8 %
            'w1': jax.random.normal(jax.random.PRNGKey(7), (256, 1))}   # 256 entries, ±8.8 %
  kf = iw.kernelize(_biased_net, params)
  msgs = _warnings_of(lambda: kf(X, None, 'nngp'))
  assert len(msgs) == 1                       # once per call, listing every noisy leaf
  assert "['w1']" in msgs[0] and "['b0']" in msgs[0] and '256 entries' in msgs[0]
  assert "['w0']" in msgs[0] and '1536 entries, ±3.6%' in msgs[0]
  assert 'param_stats' in msgs[0] and '±13.0%' in msgs[0]   # √(3.6² + 8.8² + 8.8²)
  # Exact moments for the noisy leaves silence it.
  stats = {'w0': iw.ParamStats(0.0, 1.0), 'b0': iw.ParamStats(0.0, 1.0),
           'w1': iw.ParamStats(0.0, 1.0)}
  kf = iw.kernelize(_biased_net, params, param_stats=stats)
  assert _warnings_of(lambda: kf(X, None, 'nngp')) == []


def test_sampling_error_warning_bounds_the_effect_on_the_kernel():
  """A 1024-entry bias (±4.4% on its variance) moves the kernel by percents:
  it warns although no leaf exceeds 5%; leaves of 10⁵ entries (±0.4%) do not."""
  big = {'w0': jax.random.normal(jax.random.PRNGKey(5), (D, 1024)),
         'b0': jax.random.normal(jax.random.PRNGKey(6), (1024,)),
         'w1': jax.random.normal(jax.random.PRNGKey(7), (1024, 128))}
  stats = {'w0': iw.ParamStats(0.0, 1.0), 'b0': None, 'w1': iw.ParamStats(0.0, 1.0)}
  msgs = _warnings_of(lambda: iw.kernelize(_biased_net, big, param_stats=stats)(X, None, 'nngp'))
  assert len(msgs) == 1 and "['b0']" in msgs[0] and '±4.4%' in msgs[0]
  stats = {'w0': iw.ParamStats(0.0, 1.0), 'b0': iw.ParamStats(0.0, 1.0), 'w1': None}
  assert _warnings_of(lambda: iw.kernelize(_biased_net, big, param_stats=stats)(X, None, 'nngp')) == []


def test_sampling_error_warning_for_a_64_entry_weight():
  params = {'w0': jax.random.normal(jax.random.PRNGKey(5), (D, 64)),
            'b0': jnp.zeros(64),                                        # zero-initialised
            'w1': jax.random.normal(jax.random.PRNGKey(6), (64, 1))}    # 64 entries, ±18 %
  stats = {'w0': iw.ParamStats(0.0, 1.0), 'b0': None, 'w1': None}
  kf = iw.kernelize(_biased_net, params, param_stats=stats)
  msgs = _warnings_of(lambda: kf(X, None, 'nngp'))
  assert len(msgs) == 1 and "['w1']" in msgs[0] and '64 entries' in msgs[0]
  assert "['b0']" not in msgs[0]              # variance 0: exact, nothing to warn about
  stats = dict(stats, w1=iw.ParamStats(0.0, 1.0))
  kf = iw.kernelize(_biased_net, params, param_stats=stats)
  assert _warnings_of(lambda: kf(X, None, 'nngp')) == []


# ----------------------------------------------------------------------------
# Bad input.


@pytest.fixture(scope='module')
def kernel_fn():
  return iw.kernelize(make_net(), _params(), param_stats=UNIT)


def test_feature_shapes_disagree(kernel_fn):
  with pytest.raises(iw.InfwidthError, match=r'same shape.*\(4, 6\).*\(3, 5\)'):
    kernel_fn(X, jnp.ones((3, D - 1)), 'nngp')


def test_bad_get(kernel_fn):
  with pytest.raises(iw.InfwidthError, match="'foo'"):
    kernel_fn(X, None, 'foo')
  with pytest.raises(iw.InfwidthError, match="'foo'"):
    kernel_fn(X, None, ('nngp', 'foo'))


def test_no_wide_axis():
  params = {'w': jnp.ones((D, N))}
  kf = iw.kernelize(lambda p, x: jnp.sin(x) * 2.0, params)
  with pytest.raises(iw.InfwidthError, match='no wide axis'):
    kf(X, None, 'nngp')


@pytest.mark.parametrize('leaf, kind', [('relu', 'str'), (3, 'int'), (jnp.arange(4), 'Array')])
def test_non_array_parameters(leaf, kind):
  params = dict(_params(), extra=leaf)
  with pytest.raises(iw.InfwidthError, match=r"\['extra'\].*" + kind):
    iw.kernelize(lambda p, x: make_net()(p, x), params)


@pytest.mark.parametrize('which', ['x1', 'x2'])
def test_nan_inputs_name_rows(kernel_fn, which):
  bad = X.at[1, 2].set(jnp.nan).at[3, 0].set(jnp.inf)
  args = (bad, None) if which == 'x1' else (X, bad)
  with pytest.raises(iw.InfwidthError, match=which + r' has NaN or inf entries in rows \[1, 3\]'):
    kernel_fn(*args, 'nngp')


def test_shape_dtype_struct_without_param_stats():
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _params())
  with pytest.raises(iw.InfwidthError, match=r"\['w0'\].*param_stats"):
    iw.kernelize(make_net(), abstract)
  partial = {'w0': iw.ParamStats(0.0, 1.0), 'w1': None}
  with pytest.raises(iw.InfwidthError, match=r"\['w1'\].*param_stats"):
    iw.kernelize(make_net(), abstract, param_stats=partial)


def test_nan_propagates_under_jit(kernel_fn):
  bad = X.at[1, 2].set(jnp.nan)
  k = jax.jit(kernel_fn, static_argnames='get')(bad, None, ('nngp', 'ntk'))
  for m in (np.asarray(k.nngp), np.asarray(k.ntk)):
    assert np.all(np.isnan(m[1])) and np.all(np.isnan(m[:, 1]))
    clean = np.delete(np.delete(m, 1, 0), 1, 1)
    assert np.all(np.isfinite(clean))   # one bad input poisons only its own row and column


def test_source_line_of_a_model_in_a_directory_named_infwidth(tmp_path):
  """Frames are skipped by the installed packages' locations, not by names in
  the path: a user's model under a folder called `infwidth/` keeps its line."""
  folder = tmp_path / 'infwidth' / 'jax' / 'flax'
  folder.mkdir(parents=True)
  (folder / 'user_model.py').write_text(
      'import jax.numpy as jnp\n'
      '\n'
      'def net(p, x):\n'
      '  h = x @ p["w0"]\n'
      '  return jnp.sort(h, axis=-1) @ p["w1"]\n')
  spec = importlib.util.spec_from_file_location('user_model', folder / 'user_model.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(iw.UnsupportedPrimitiveError) as info:
    iw.kernelize(module.net, _params(), param_stats=UNIT)(X, None, 'nngp')
  assert info.value.source.startswith(str(folder / 'user_model.py') + ':5 (net)')

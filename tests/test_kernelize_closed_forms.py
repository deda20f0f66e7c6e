"""kernelize on dense networks against closed forms written independently here.

Oracles: the arc-cosine kernel of Cho & Saul (2009) for ReLU, Williams' (1997)
arcsine kernel for erf, and NT's Table 1 recursion
(`K ← σ_w² T(K) + σ_b²`, `Θ ← σ_w² T(K) + σ_b² + σ_w² Ṫ(K) Θ`) for the NTK.
With exact `param_stats` the kernel at any concrete width is the
infinite-width kernel, so the comparisons are to float64 round-off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

import infwidth as iw

D = 6        # input dimension
N = 48       # hidden width (only bookkeeping with exact moments)
C = 3        # output logits
SW, SB = 1.3, 0.4   # σ_w, σ_b


# ----------------------------------------------------------------------------
# Independent closed forms (numpy, float64).


def _relu_T(k11, k22, k12):
  """Cho & Saul arc-cosine kernel of degree 1 and its degree-0 derivative kernel."""
  norm = np.sqrt(k11 * k22)
  cos = np.clip(k12 / norm, -1.0, 1.0)
  th = np.arccos(cos)
  t = norm * (np.sin(th) + (np.pi - th) * cos) / (2 * np.pi)
  tdot = (np.pi - th) / (2 * np.pi)
  return t, tdot


def _erf_T(k11, k22, k12):
  """Williams' arcsine kernel E[erf(u)erf(v)] and E[erf'(u)erf'(v)]."""
  a = (1 + 2 * k11) * (1 + 2 * k22)
  t = 2 / np.pi * np.arcsin(2 * k12 / np.sqrt(a))
  tdot = 4 / np.pi / np.sqrt(a - 4 * k12 ** 2)
  return t, tdot


_T = {'relu': _relu_T, 'erf': _erf_T}
_PHI = {'relu': jax.nn.relu, 'erf': erf}


def recursion(x1, x2, depth, act, param='ntk', n=N, sw=SW, sb=SB, scale_in=1.0):
  """NT's Table 1 for a `depth`-hidden-layer MLP; returns (K, Θ) of the output.

  `param='ntk'`: W ~ N(0,1) multiplied by σ_w/√fan_in, b ~ N(0,1) by σ_b.
  `param='standard'`: W ~ N(0, σ_w²/fan_in), b ~ N(0, σ_b²), no multipliers;
  the NNGP is the same, and a weight's own gradient term is `fan_in·E[yy']`
  (with `v = σ_w²/fan_in`) instead of `σ_w² E[yy']`, a bias's is 1.
  `scale_in` multiplies the first pre-activation (to build φ(2h)).
  """
  x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
  d = x1.shape[1]

  def lin(e12, e11, e22, th, fan_in):
    k12, k11, k22 = (sw ** 2 * e + sb ** 2 for e in (e12, e11, e22))
    own = (sw ** 2 * e12 + sb ** 2) if param == 'ntk' else (fan_in * e12 + 1.0)
    return k12, k11, k22, own + sw ** 2 * th

  e12 = x1 @ x2.T / d
  e11 = np.sum(x1 ** 2, 1)[:, None] / d
  e22 = np.sum(x2 ** 2, 1)[None, :] / d
  if param == 'ntk':
    k12, k11, k22, th = lin(e12, e11, e22, 0.0, d)
  else:
    k12, k11, k22 = (sw ** 2 * e + sb ** 2 for e in (e12, e11, e22))
    th = x1 @ x2.T + 1.0
  s2 = scale_in ** 2
  k12, k11, k22, th = s2 * k12, s2 * k11, s2 * k22, s2 * th
  for _ in range(depth):
    t12, tdot = _T[act](k11, k22, k12)
    t11, _ = _T[act](k11, k11, k11)
    t22, _ = _T[act](k22, k22, k22)
    k12, k11, k22, th = lin(t12, t11, t22, tdot * th, n)
  return k12, th


# ----------------------------------------------------------------------------
# Networks.


def init(key, depth, param='ntk', n=N, d=D, c=C, sw=SW, sb=SB, dtype=jnp.float64):
  """Parameters and exact moments of a `depth`-hidden-layer MLP."""
  widths = [d] + [n] * depth + [c]
  params, stats = [], []
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    k1, k2, key = jax.random.split(key, 3)
    wv, bv = (1.0, 1.0) if param == 'ntk' else (sw ** 2 / a, sb ** 2)
    params.append((np.sqrt(wv) * jax.random.normal(k1, (a, b), dtype),
                   np.sqrt(bv) * jax.random.normal(k2, (b,), dtype)))
    stats.append((iw.ParamStats(0.0, wv), iw.ParamStats(0.0, bv)))
  return params, stats


def make_mlp(act, param='ntk', sw=SW, sb=SB, double=None):
  """`double='add'` builds φ(h + h) and `double='mul'` φ(2h) in the first layer."""
  phi = _PHI[act]

  def mlp(params, x):
    h = x
    for i, (w, b) in enumerate(params):
      if param == 'ntk':
        h = sw / np.sqrt(w.shape[0]) * (h @ w) + sb * b
      else:
        h = h @ w + b
      if i == 0 and double == 'add':
        h = h + h
      elif i == 0 and double == 'mul':
        h = 2.0 * h
      if i < len(params) - 1:
        h = phi(h)
    return h

  return mlp


def inputs(key, n1=5, n2=4, d=D, dtype=jnp.float64):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, (n1, d), dtype), 0.8 * jax.random.normal(k2, (n2, d), dtype))


KEY = jax.random.PRNGKey(11)
X1, X2 = inputs(KEY)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


# ----------------------------------------------------------------------------
# Tests.


def test_relu_nngp_is_arc_cosine_kernel():
  # One hidden layer, no biases, unit weights: K = E[relu(u) relu(v)] with
  # Cov(u, v) = x·x'/d, exactly Cho & Saul's degree-1 kernel (times 1/2π).
  def net(p, x):
    h = jax.nn.relu(x @ p[0] / np.sqrt(D))
    return h @ p[1] / np.sqrt(N)

  p = [jax.random.normal(KEY, (D, N)), jax.random.normal(KEY, (N, 1))]
  st = [iw.ParamStats(0.0, 1.0)] * 2
  got = iw.kernelize(net, p, param_stats=st)(X1, X2, 'nngp')
  n1 = np.linalg.norm(X1, axis=1)[:, None]
  n2 = np.linalg.norm(X2, axis=1)[None, :]
  th = np.arccos(np.clip(np.asarray(X1 @ X2.T) / (n1 * n2), -1, 1))
  # Cho & Saul (2009), eq. 6 with n = 1: k1 = |x||y| J1(θ)/π, J1 = sin θ + (π-θ) cos θ.
  arc = n1 * n2 / np.pi * (np.sin(th) + (np.pi - th) * np.cos(th))
  want = arc / (2 * D)
  assert got.shape == (5, 4)
  # Both sides are float64 closed forms; 1e-6 leaves room only for round-off.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize('act', ['relu', 'erf'])
@pytest.mark.parametrize('depth', [1, 3])
def test_ntk_parameterisation_matches_table_1(act, depth):
  p, st = init(KEY, depth)
  kf = iw.kernelize(make_mlp(act), p, param_stats=st)
  k = kf(X1, X2, ('nngp', 'ntk'))
  want_k, want_t = recursion(X1, X2, depth, act)
  assert k.nngp.shape == k.ntk.shape == (5, 4)
  # Same maths in float64 on both sides: agreement to round-off (1e-10 relative).
  assert _rel(k.nngp, want_k) < 1e-10
  assert _rel(k.ntk, want_t) < 1e-10


@pytest.mark.parametrize('act', ['relu', 'erf'])
@pytest.mark.parametrize('depth', [1, 3])
def test_standard_parameterisation(act, depth):
  p, st = init(KEY, depth, param='standard')
  kf = iw.kernelize(make_mlp(act, param='standard'), p, param_stats=st)
  k = kf(X1, X2, ('nngp', 'ntk'))
  want_k, want_t = recursion(X1, X2, depth, act, param='standard')
  ntk_k, ntk_t = recursion(X1, X2, depth, act, param='ntk')
  # Same NNGP as NTK parameterisation; an NTK whose weight terms carry fan_in.
  assert _rel(k.nngp, want_k) < 1e-10
  assert _rel(want_k, ntk_k) < 1e-12
  assert _rel(k.ntk, want_t) < 1e-10
  assert _rel(want_t, ntk_t) > 0.5   # the two NTKs really differ (a non-vacuous check)


def test_standard_parameterisation_ntk_grows_with_width():
  # Θ/n → the last layer's E[yy'] as n → ∞; at two widths the weight term scales with n.
  ths = []
  for n in (32, 128):
    p, st = init(KEY, 1, param='standard', n=n)
    ths.append(np.asarray(iw.kernelize(make_mlp('relu', param='standard'), p, param_stats=st)(X1, None, 'ntk')))
    _, want = recursion(X1, X1, 1, 'relu', param='standard', n=n)
    assert _rel(ths[-1], want) < 1e-10
  # Θ(n) = n·T + (terms independent of n): the difference quotient in n is T.
  np.testing.assert_allclose((ths[1] - ths[0]) / (128 - 32), _one_layer_T(X1), rtol=1e-9)


def _one_layer_T(x):
  x = np.asarray(x)
  k = SW ** 2 * x @ x.T / D + SB ** 2
  dg = np.diag(k)
  t, _ = _relu_T(dg[:, None], dg[None, :], k)
  return t


@pytest.mark.parametrize('act', ['relu', 'erf'])
def test_h_plus_h_is_4k(act):
  # f = W2·φ(h + h): the first-layer value h + h has kernel 4K and NTK 4Θ, so
  # the network equals W2·φ(2h) and the recursion started from 4K, 4Θ.
  p, st = init(KEY, 1)
  add = iw.kernelize(make_mlp(act, double='add'), p, param_stats=st)(X1, X2, ('nngp', 'ntk'))
  mul = iw.kernelize(make_mlp(act, double='mul'), p, param_stats=st)(X1, X2, ('nngp', 'ntk'))
  want_k, want_t = recursion(X1, X2, 1, act, scale_in=2.0)
  wrong_k, _ = recursion(X1, X2, 1, act, scale_in=np.sqrt(2.0))   # what 2K would give
  assert _rel(want_k, wrong_k) > 1e-2
  for k in (add, mul):
    assert _rel(k.nngp, want_k) < 1e-10
    assert _rel(k.ntk, want_t) < 1e-10


def test_h_plus_h_output_is_4k():
  # The output itself doubled: exactly 4K and 4Θ of the undoubled network.
  p, st = init(KEY, 1)
  base = make_mlp('erf')
  k1 = iw.kernelize(base, p, param_stats=st)(X1, X2, ('nngp', 'ntk'))
  k2 = iw.kernelize(lambda q, x: base(q, x) + base(q, x), p, param_stats=st)(X1, X2, ('nngp', 'ntk'))
  np.testing.assert_allclose(k2.nngp, 4 * k1.nngp, rtol=1e-12)
  np.testing.assert_allclose(k2.ntk, 4 * k1.ntk, rtol=1e-12)


def _assert_psd(m):
  m = np.asarray(m, np.float64)
  np.testing.assert_allclose(m, m.T, rtol=1e-12, atol=1e-14 * np.abs(m).max())
  ev = np.linalg.eigvalsh(m)
  assert ev.min() >= -1e-10 * np.abs(ev).max()


@pytest.mark.parametrize('act', ['relu', 'erf'])
@pytest.mark.parametrize('param', ['ntk', 'standard'])
def test_symmetric_psd_and_kernel_fields(act, param):
  p, st = init(KEY, 2, param=param)
  # Nearly collinear rows make the PSD check sharp (small eigenvalues).
  x = jnp.concatenate([X1, X1[:2] + 1e-3 * X2[:2], jnp.zeros((1, D))])
  k = iw.kernelize(make_mlp(act, param=param), p, param_stats=st)(x)
  assert isinstance(k, iw.Kernel)
  assert k.x1_is_x2 and k.cov2 is None
  for m in (k.nngp, k.ntk):
    assert m.shape == (8, 8)
    _assert_psd(m)
  np.testing.assert_allclose(k.cov1, np.diag(k.nngp), rtol=1e-12)


def test_x1_x2_blocks_match_joint_computation():
  p, st = init(KEY, 3)
  kf = iw.kernelize(make_mlp('relu'), p, param_stats=st)
  cross = kf(X1, X2)
  joint = kf(jnp.concatenate([X1, X2]))
  n1 = X1.shape[0]
  assert not cross.x1_is_x2
  np.testing.assert_allclose(cross.nngp, joint.nngp[:n1, n1:], rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(cross.ntk, joint.ntk[:n1, n1:], rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(cross.cov1, np.diag(joint.nngp)[:n1], rtol=1e-12)
  np.testing.assert_allclose(cross.cov2, np.diag(joint.nngp)[n1:], rtol=1e-12)
  rev = kf(X2, X1, 'ntk')
  np.testing.assert_allclose(rev, cross.ntk.T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize('act', ['relu', 'erf'])
def test_float32_matches_float64(act):
  p64, st = init(KEY, 3)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p64)
  x1, x2 = X1.astype(jnp.float32), X2.astype(jnp.float32)
  k32 = iw.kernelize(make_mlp(act), p32, param_stats=st)(x1, x2, ('nngp', 'ntk'))
  k64 = iw.kernelize(make_mlp(act), p64, param_stats=st)(X1, X2, ('nngp', 'ntk'))
  assert k32.nngp.dtype == jnp.float32 and k32.ntk.dtype == jnp.float32
  # Four layers of float32 arithmetic (ε ≈ 6e-8) and arccos near ±1: ~1e-5 relative.
  assert _rel(k32.nngp, k64.nngp) < 1e-5
  assert _rel(k32.ntk, k64.ntk) < 1e-5


def test_float32_ntk_of_an_input_with_itself_is_accurate():
  # jit(kernel_fn)(x, x): x2 is another tracer, so the cross block and the
  # variances come from different reductions and ρ on the diagonal misses 1
  # by ulps; J0 is √-sensitive there (measured before snapping ρ: 1.5e-3 of
  # the NTK after 12 ReLU layers). The float64 kernel is the oracle.
  p64, st = init(KEY, 12)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p64)
  x = jax.random.normal(KEY, (16, D), jnp.float64)
  f32 = jax.jit(iw.kernelize(make_mlp('relu'), p32, param_stats=st), static_argnames='get')
  k32 = f32(x.astype(jnp.float32), x.astype(jnp.float32), ('nngp', 'ntk'))
  k64 = iw.kernelize(make_mlp('relu'), p64, param_stats=st)(x, None, ('nngp', 'ntk'))
  assert _rel(k32.nngp, k64.nngp) < 1e-5
  assert _rel(k32.ntk, k64.ntk) < 1e-5


def test_jit_gives_same_numbers():
  p, st = init(KEY, 3)
  kf = iw.kernelize(make_mlp('erf'), p, param_stats=st)
  jf = jax.jit(kf, static_argnames='get')
  for get in ('nngp', 'ntk'):
    np.testing.assert_allclose(jf(X1, X2, get), kf(X1, X2, get), rtol=1e-12)
  both = jf(X1, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(both.ntk, kf(X1, None, 'ntk'), rtol=1e-12)
  kj = jf(X1, X2)
  np.testing.assert_allclose(kj.nngp, kf(X1, X2, 'nngp'), rtol=1e-12)


def _total(kf, x, x2=None):
  k = kf(x, x2, ('nngp', 'ntk'))
  return jnp.sum(k.nngp) + 0.5 * jnp.sum(k.ntk)


def test_grad_finite_on_diagonal():
  # x2=None: the diagonal has correlation 1, where arccos' is infinite.
  p, st = init(KEY, 2)
  kf = iw.kernelize(make_mlp('relu'), p, param_stats=st)
  grad = jax.grad(lambda x: _total(kf, x))
  g = grad(X1)
  assert g.shape == X1.shape
  assert np.all(np.isfinite(g))
  # ...and zero-norm inputs (an all-zero row) keep it finite too.
  assert np.all(np.isfinite(grad(X1.at[0].set(0.0))))


@pytest.mark.parametrize('act', ['relu', 'erf'])
def test_grad_matches_finite_differences(act):
  p, st = init(KEY, 2)
  kf = iw.kernelize(make_mlp(act), p, param_stats=st)
  f = lambda x: _total(kf, x, X2)
  g = np.asarray(jax.grad(f)(X1))
  # Directional derivatives along random directions by central differences in
  # float64: error O(h^2 f''') + O(eps |f| / h), about 1e-8 relative at h = 1e-4.
  h = 1e-4
  for seed in range(3):
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), X1.shape))
    fd = (f(X1 + h * v) - f(X1 - h * v)) / (2 * h)
    np.testing.assert_allclose(np.sum(g * v), fd, rtol=1e-6)


def test_apply_kwargs_are_forwarded():
  p, st = init(KEY, 1)
  base = make_mlp('relu')

  def net(params, x, train=True):
    return base(params, x) * (2.0 if train else 1.0)

  kf = iw.kernelize(net, p, param_stats=st)
  k = kf(X1, X2, 'nngp')
  np.testing.assert_allclose(kf(X1, X2, 'nngp', train=False), k / 4, rtol=1e-12)
  jf = jax.jit(kf, static_argnames=('get', 'train'))
  np.testing.assert_allclose(jf(X1, X2, 'nngp', train=False), k / 4, rtol=1e-12)


def test_relu_written_with_where():
  p, st = init(KEY, 1)
  where_relu = lambda h: jnp.where(h > 0, h, 0.0)

  def net(params, x):
    (w0, b0), (w1, b1) = params
    h = where_relu(SW / np.sqrt(D) * (x @ w0) + SB * b0)
    return SW / np.sqrt(N) * (h @ w1) + SB * b1

  k = iw.kernelize(net, p, param_stats=st)(X1, X2, ('nngp', 'ntk'))
  want_k, want_t = recursion(X1, X2, 1, 'relu')
  assert _rel(k.nngp, want_k) < 1e-10
  assert _rel(k.ntk, want_t) < 1e-10


@pytest.mark.parametrize('act', ['elu', 'selu'])
def test_elu_family_against_direct_sampling(act):
  # Oracle: E[φ(u)φ(v)] from 4·10⁵ draws of the 2-D Gaussian per input pair
  # (DESIGN §6), tolerance 5 SE of that average (SE from the draws' spread).
  phi = getattr(jax.nn, act)

  def net(params, x):
    (w0, b0), (w1, b1) = params
    h = phi(SW / np.sqrt(D) * (x @ w0) + SB * b0)
    return SW / np.sqrt(N) * (h @ w1) + SB * b1

  p, st = init(KEY, 1)
  k = np.asarray(iw.kernelize(net, p, param_stats=st)(X1[:3], None, 'nngp'))
  x = np.asarray(X1[:3])
  k0 = SW ** 2 * x @ x.T / D + SB ** 2
  z = np.random.default_rng(0).standard_normal((2, 400_000))
  for i in range(3):
    for j in range(3):
      cov = np.array([[k0[i, i], k0[i, j]], [k0[i, j], k0[j, j]]])
      L = np.linalg.cholesky(cov + 1e-12 * np.eye(2))
      u, v = L @ z
      prod = SW ** 2 * np.asarray(phi(u) * phi(v)) + SB ** 2
      se = prod.std() / np.sqrt(prod.size)
      assert abs(k[i, j] - prod.mean()) < 5 * se


def test_pytree_of_outputs_gives_pytree_of_kernels():
  p, st = init(KEY, 1)
  net = make_mlp('relu')
  two = lambda params, x: (net(params, x), 2.0 * net(params, x))
  k = iw.kernelize(two, p, param_stats=st)(X1, X2, 'nngp')
  want, _ = recursion(X1, X2, 1, 'relu')
  assert isinstance(k, tuple) and len(k) == 2
  assert _rel(k[0], want) < 1e-10
  assert _rel(k[1], 4 * want) < 1e-10

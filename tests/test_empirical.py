"""Empirical NTK/NNGP: every implementation against an explicit J(x1) J(x2)ᵀ.

The oracle builds full Jacobians with `jax.jacobian`, flattens each leaf and
contracts them with `np.einsum`; traces and diagonals are taken with
hand-written einsum strings per case. Models form a small zoo: plain JAX
MLP, CNN with average pooling, residual network with a shared weight,
self-attention block, embeddings (`gather`), custom_jvp/custom_vjp and
nested jit, Flax linen, Haiku and Equinox.
"""

import functools

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import infwidth as iw
from infwidth.empirical import empirical_kernels

IMPLS = [iw.NtkImplementation.JACOBIAN_CONTRACTION,
         iw.NtkImplementation.NTK_VECTOR_PRODUCTS,
         iw.NtkImplementation.STRUCTURED_DERIVATIVES,
         iw.NtkImplementation.AUTO]


def keys(n, seed=0):
  return list(jax.random.split(jax.random.PRNGKey(seed), n))


# MODEL ZOO: name -> (apply_fn, params, x1, x2)


def mlp_model():
  k = keys(8)
  dims = [3, 8, 8, 4]
  params = [(jax.random.normal(k[i], (dims[i], dims[i + 1])),
             jax.random.normal(k[i + 4], (dims[i + 1],))) for i in range(3)]

  def f(p, x):
    for W, b in p[:-1]:
      x = jax.nn.relu(x @ W / np.sqrt(W.shape[0]) + 0.1 * b)
    W, b = p[-1]
    return x @ W / np.sqrt(W.shape[0]) + b
  return f, params, jax.random.normal(k[3], (5, 3)), jax.random.normal(
      k[7], (4, 3))


def avg_pool(x):
  return lax.reduce_window(x, 0., lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                           'VALID') / 4.


def cnn_model():
  k = keys(6, 1)
  params = dict(c1=jax.random.normal(k[0], (3, 3, 2, 4)),
                b1=jax.random.normal(k[1], (4,)),
                c2=jax.random.normal(k[2], (2, 2, 4, 3)),
                w=jax.random.normal(k[3], (2 * 3 * 3, 3)))

  def f(p, x):
    dn = ('NHWC', 'HWIO', 'NHWC')
    h = lax.conv_general_dilated(x, p['c1'], (1, 1), 'SAME',
                                 dimension_numbers=dn) / 18 ** .5
    h = jnp.tanh(h + p['b1'])
    h = lax.conv_general_dilated(h, p['c2'], (1, 1), ((0, 1), (1, 0)),
                                 rhs_dilation=(2, 1), dimension_numbers=dn)
    h = avg_pool(jax.nn.relu(h / 4.))
    return h.reshape(h.shape[0], -1) @ p['w'] / 18 ** .5
  return f, params, jax.random.normal(k[4], (3, 6, 6, 2)), jax.random.normal(
      k[5], (2, 6, 6, 2))


def strided_cnn_model():
  """NCHW/OIHW layout, strides and lhs dilation."""
  k = keys(4, 2)
  params = (jax.random.normal(k[0], (3, 2, 3, 2)),
            jax.random.normal(k[1], (3 * 4 * 5, 2)))

  def f(p, x):
    h = lax.conv_general_dilated(x, p[0], (2, 1), ((1, 1), (0, 1)),
                                 lhs_dilation=(1, 2),
                                 dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
    h = jnp.sin(h)
    return h.reshape(h.shape[0], -1) @ p[1]
  return f, params, jax.random.normal(k[2], (3, 2, 7, 3)), jax.random.normal(
      k[3], (2, 2, 7, 3))


def resnet_model():
  """Residual blocks; the second block reuses the first block's weight."""
  k = keys(5, 3)
  params = dict(w0=jax.random.normal(k[0], (3, 6)),
                w1=jax.random.normal(k[1], (6, 6)),
                w2=jax.random.normal(k[2], (6, 2)))

  def f(p, x):
    h = x @ p['w0']
    h = h + jax.nn.relu(h) @ p['w1'] / np.sqrt(6)
    h = h + jnp.tanh(h) @ (0.5 * p['w1'].T).T   # shared weight, scaled
    return jax.nn.gelu(h) @ p['w2']
  return f, params, jax.random.normal(k[3], (4, 3)), jax.random.normal(
      k[4], (3, 3))


def attention_model():
  """One self-attention block with LayerNorm; output (N, T, D)."""
  k = keys(8, 4)
  d = 4
  params = dict(q=jax.random.normal(k[0], (d, d)),
                k=jax.random.normal(k[1], (d, d)),
                v=jax.random.normal(k[2], (d, 2, 2)),
                o=jax.random.normal(k[3], (2, 2, d)),
                scale=1. + 0.1 * jax.random.normal(k[4], (d,)),
                bias=0.1 * jax.random.normal(k[5], (d,)))

  def f(p, x):
    q = jnp.einsum('ntd,de->nte', x, p['q'])
    kk = jnp.einsum('ntd,de->nte', x, p['k'])
    v = jnp.einsum('ntd,dhc->nthc', x, p['v'])
    a = jax.nn.softmax(jnp.einsum('nte,nse->nts', q, kk) / 2., axis=-1)
    h = jnp.einsum('nts,nshc->nthc', a, v)
    h = x + jnp.einsum('nthc,hcd->ntd', h, p['o']) / 2.
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-3)
    return h * p['scale'] + p['bias']
  return f, params, jax.random.normal(k[6], (3, 3, d)), jax.random.normal(
      k[7], (2, 3, d))


def embedding_model():
  """Embedding lookups (gather) with a tied output projection."""
  k = keys(4, 5)
  params = dict(emb=jax.random.normal(k[0], (11, 4)),
                pos=jax.random.normal(k[1], (5, 4)),
                w=jax.random.normal(k[2], (4, 3)))

  def f(p, tokens):
    h = jnp.take(p['emb'], tokens, axis=0) + p['pos'][:tokens.shape[1]]
    h = jnp.tanh(h).mean(1)
    return h @ p['w'] + h @ p['emb'][:3].T   # tied: emb used by a dot too
  t1 = jax.random.randint(k[3], (4, 5), 0, 11)
  t2 = (t1[:3] * 7 + 2) % 11
  return f, params, t1, t2


def embedding_only_model():
  """Pure lookups: structured derivatives without the tied fallback."""
  k = keys(3, 6)
  params = dict(emb=jax.random.normal(k[0], (50, 4)),
                w=jax.random.normal(k[1], (4, 2)))

  def f(p, tokens):
    h = p['emb'][tokens]
    return jnp.tanh(h).mean(1) @ p['w']
  t1 = jax.random.randint(k[2], (4, 6), 0, 50)
  return f, params, t1, (t1[:2] + 3) % 50


def rnn_model():
  """A scan over time with a shared weight, then a cond: weights inside
  control flow take the Jacobian-contraction fallback."""
  k = keys(5, 13)
  params = dict(wi=jax.random.normal(k[0], (3, 5)),
                wh=jax.random.normal(k[1], (5, 5)),
                wo=jax.random.normal(k[2], (5, 2)))

  def f(p, x):
    def step(h, xt):
      return jnp.tanh(xt @ p['wi'] + h @ p['wh'] / 5 ** .5), None
    h, _ = lax.scan(step, jnp.zeros((x.shape[0], 5)), jnp.swapaxes(x, 0, 1))
    out = h @ p['wo']
    return lax.cond(jnp.sum(x) > 0, lambda o: o, lambda o: -o, out)
  return f, params, jax.random.normal(k[3], (3, 4, 3)), jax.random.normal(
      k[4], (2, 4, 3))


@jax.custom_vjp
def _dense(x, w):
  return x @ w


_dense.defvjp(lambda x, w: (x @ w, (x, w)),
              lambda res, g: (g @ res[1].T, res[0].T @ g))


@jax.custom_jvp
def _softplus(x):
  return jnp.logaddexp(x, 0.)


_softplus.defjvp(lambda p, t: (_softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0]))


def custom_model():
  """custom_vjp layer taking a weight, custom_jvp activation, nested jit."""
  k = keys(4, 7)
  params = (jax.random.normal(k[0], (3, 5)), jax.random.normal(k[1], (5, 2)))

  @jax.jit
  def inner(w, h):
    return jax.jit(lambda a, b: a @ b)(_softplus(h), w)

  def f(p, x):
    return inner(p[1], _dense(x, p[0]))
  return f, params, jax.random.normal(k[2], (4, 3)), jax.random.normal(
      k[3], (2, 3))


def to64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


class _FlaxCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(5)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(nn.gelu(x))


def flax_model():
  k = keys(3, 8)
  model = _FlaxCNN()
  x1 = jax.random.normal(k[0], (3, 4, 4, 2))
  params = to64(model.init(k[2], x1))
  return model.apply, params, x1, jax.random.normal(k[1], (2, 4, 4, 2))


def haiku_model():
  def net(x):
    return hk.nets.MLP([6, 6, 3], activation=jnp.tanh)(x)
  t = hk.without_apply_rng(hk.transform(net))
  k = keys(3, 9)
  x1 = jax.random.normal(k[0], (4, 3))
  return t.apply, to64(t.init(k[2], x1)), x1, jax.random.normal(k[1], (3, 3))


def equinox_model():
  k = keys(3, 10)
  mlp = eqx.nn.MLP(3, 2, 5, 2, activation=jax.nn.softplus, key=k[2])
  params, static = eqx.partition(mlp, eqx.is_inexact_array)
  params = to64(params)

  def f(p, x):
    return jax.vmap(eqx.combine(p, static))(x)
  return f, params, jax.random.normal(k[0], (4, 3)), jax.random.normal(
      k[1], (2, 3))


MODELS = dict(mlp=mlp_model, cnn=cnn_model, strided_cnn=strided_cnn_model,
              resnet=resnet_model, attention=attention_model,
              embedding=embedding_model, embedding_only=embedding_only_model,
              custom=custom_model, rnn=rnn_model, flax=flax_model,
              haiku=haiku_model, equinox=equinox_model)


# ORACLE


def explicit_ntk(f, params, x1, x2):
  """Full `Θ[a..., b...]` over all output axes, from explicit Jacobians.

  One Jacobian of `f` on the concatenated inputs (the zoo's models treat
  examples independently), split into the rows of `x1` and of `x2`.
  """
  n1 = jax.tree.leaves(x1)[0].shape[0]
  xs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
  jac = jax.tree.leaves(jax.jit(jax.jacobian(f))(params, xs))
  shape = f(params, xs).shape
  s1, s2 = (n1,) + shape[1:], (shape[0] - n1,) + shape[1:]
  total = 0.
  for j in jac:
    j = np.asarray(j).reshape(shape[0], int(np.prod(shape[1:])), -1)
    a = j[:n1].reshape(int(np.prod(s1)), -1)
    b = j[n1:].reshape(int(np.prod(s2)), -1)
    total = total + np.einsum('ip,jp->ij', a, b)
  return total.reshape(s1 + s2)


# Per output rank: (trace_axes, diagonal_axes, einsum from full Θ, divisor).
CASES_2D = [((-1,), (), 'acbc->ab', 'C'),
            ((), (), 'acbd->abcd', 1),
            ((), (0,), 'acad->acd', 1),
            ((), (-1,), 'acbc->abc', 1)]
CASES_3D = [((-1,), (), 'atcbsc->abts', 'C'),
            ((-1,), (1,), 'atcbtc->abt', 'C'),
            ((1, 2), (), 'atcbtc->ab', 'TC'),
            ((), (0, 1), 'atcatd->atcd', 1)]


def reference(full, rank, case, shape):
  _, _, spec, div = case
  out = np.einsum(spec, full)
  sizes = dict(C=shape[-1], T=shape[1] if rank == 3 else 1)
  return out / (1 if div == 1 else np.prod([sizes[c] for c in div]))


def assert_close(a, b, rtol=1e-10):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  scale = np.max(np.abs(b))
  assert scale > 0
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


# TESTS


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def _jacobians(name):
  """Per-leaf Jacobians `(rows, outputs, params)` on `x1` then `x2`."""
  f, params, x1, x2 = MODELS[name]()
  xs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
  shape = f(params, xs).shape
  jac = jax.tree.leaves(jax.jit(jax.jacobian(f))(params, xs))
  return ([np.asarray(j).reshape(shape[0], int(np.prod(shape[1:])), -1)
           for j in jac], shape, jax.tree.leaves(x1)[0].shape[0])


def model_and_oracle(name, same):
  """The model, and `Θ` between x1 and x2 (x1 and x1 if `same`)."""
  f, params, x1, x2 = MODELS[name]()
  jac, shape, n1 = _jacobians(name)
  r1, r2 = slice(0, n1), slice(0, n1) if same else slice(n1, None)
  full = sum(np.einsum('aop,bqp->aobq', j[r1], j[r2]) for j in jac)
  nb = n1 if same else shape[0] - n1
  full = full.reshape((n1,) + shape[1:] + (nb,) + shape[1:])
  return f, params, x1, x1 if same else x2, full


def _model_impl_cases():
  """Every model with every implementation; Jacobian contraction (the plain
  `jax.jacobian` path, the slowest) on all models but the MLP in `slow`."""
  for name in sorted(MODELS):
    for impl in IMPLS:
      slow = impl == iw.NtkImplementation.JACOBIAN_CONTRACTION and name != 'mlp'
      yield pytest.param(name, impl, id=f'{name}-{impl.name}',
                         marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize('name,impl', list(_model_impl_cases()))
def test_ntk_matches_explicit_jacobians(name, impl):
  f, params, x1, _ = MODELS[name]()
  shape = f(params, x1).shape
  rank = len(shape)
  cases = CASES_2D if rank == 2 else CASES_3D
  # Every case runs for every model, spread over the implementations
  # (all of them for every implementation on the MLP).
  n = int(impl)
  which = (range(4) if name == 'mlp' else [0] if n == 0 else
           [1, 3] if n == 3 else [n % 4])
  for i in which:
    trace_axes, diagonal_axes = cases[i][:2]
    same = 0 in diagonal_axes
    f, params, x1, xb, full = model_and_oracle(name, same)
    want = reference(full, rank, cases[i], shape)
    # Alternate vmap_axes over cases and models.
    vmap_axes = 0 if (i + n + sorted(MODELS).index(name)) % 2 else None
    ntk_fn = jax.jit(iw.empirical_ntk_fn(f, trace_axes, diagonal_axes,
                                         vmap_axes, impl))
    assert_close(ntk_fn(x1, None if same else xb, params), want)


@pytest.mark.parametrize('impl', IMPLS, ids=lambda i: i.name)
def test_vmap_axes_triple_with_kwargs(impl):
  """vmap_axes=(in, out, kwargs): a batched keyword argument, split between
  x1 and x2 as a pair, and outputs batched along axis 1."""
  f0, params, x1, x2 = mlp_model()

  def f(p, x, shift):
    return jnp.swapaxes(f0(p, x + shift[:, None]), 0, 1)  # (C, N)

  s1, s2 = jnp.arange(5.) / 5, jnp.arange(4.) / 3
  j1 = jax.tree.leaves(jax.jacobian(lambda p: f(p, x1, s1))(params))
  j2 = jax.tree.leaves(jax.jacobian(lambda p: f(p, x2, s2))(params))
  want = sum(np.einsum('cap,cbp->ab', np.reshape(a, a.shape[:2] + (-1,)),
                       np.reshape(b, b.shape[:2] + (-1,)))
             for a, b in zip(j1, j2)) / 4
  ntk_fn = iw.empirical_ntk_fn(f, trace_axes=(0,),
                               vmap_axes=(0, 1, dict(shift=0)),
                               implementation=impl)
  assert_close(ntk_fn(x1, x2, params, shift=(s1, s2)), want)


def test_nngp_and_kernel_fn_get():
  f, params, x1, x2 = model_and_oracle('attention', False)[:4]
  full = model_and_oracle('attention', False)[4]
  kernel_fn = iw.empirical_kernel_fn(f, trace_axes=(-1,), diagonal_axes=(1,),
                                     implementation=3)
  k = jax.jit(lambda a, b, p: kernel_fn(a, b, ('nngp', 'ntk'), p))(
      x1, x2, params)
  assert k._fields == ('nngp', 'ntk')
  o1, o2 = np.asarray(f(params, x1)), np.asarray(f(params, x2))
  assert_close(k.nngp, np.einsum('atc,btc->abt', o1, o2) / o1.shape[-1])
  assert_close(kernel_fn(x1, x2, 'nngp', params), k.nngp)
  assert_close(k.ntk, np.einsum('atcbtc->abt', full) / o1.shape[-1])
  both = jax.eval_shape(lambda a: kernel_fn(a, None, None, params), x1)
  assert both.nngp.shape == (3, 3, 3) and both.ntk.shape == (3, 3, 3)
  nngp_fn = iw.empirical_nngp_fn(f, trace_axes=(), diagonal_axes=(0,))
  assert_close(nngp_fn(x1, None, params), np.einsum('atc,asd->atscd', o1, o1))


def test_pytree_outputs_get_one_kernel_each():
  f0, params, x1, x2, full = model_and_oracle('mlp', False)
  f = lambda p, x: {'a': f0(p, x), 'b': f0(p, x)[:, :2] ** 2}
  full_b = explicit_ntk(lambda p, x: f(p, x)['b'], params, x1, x2)
  for impl in IMPLS[:3]:
    kernel_fn = iw.empirical_kernel_fn(f, implementation=impl, vmap_axes=0)
    k = jax.jit(lambda a, b, p: kernel_fn(a, b, ('ntk',), p))(x1, x2, params)
    assert_close(k['b'].ntk, np.einsum('acbc->ab', full_b) / 2)
    assert_close(k['a'].ntk, np.einsum('acbc->ab', full) / 4)


def test_jit_and_float32():
  f, params, x1, x2, full = model_and_oracle('cnn', False)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  want = np.einsum('acbc->ab', full) / 3
  for impl in IMPLS:
    fn = jax.jit(iw.empirical_ntk_fn(f, vmap_axes=0, implementation=impl))
    got = fn(x1.astype(jnp.float32), x2.astype(jnp.float32), p32)
    assert got.dtype == jnp.float32
    assert_close(got, want, rtol=1e-4)


def test_empirical_kernels_weights_and_symmetry():
  f, params, x1, x2, full = model_and_oracle('flax', False)
  weights = jax.tree.map(lambda _: 1., params)
  weights['params']['Dense_1']['kernel'] = 0.
  weights['params']['Conv_0']['kernel'] = 2.5
  jac = jax.jit(jax.jacobian(f))
  ja, jb = jac(params, x1), jac(params, x2)

  def part(path):
    sel = lambda t: [l for p, l in jax.tree_util.tree_leaves_with_path(t)
                     if path in jax.tree_util.keystr(p)][0]
    a, b = np.asarray(sel(ja)), np.asarray(sel(jb))
    return np.einsum('acp,bcp->ab', a.reshape(a.shape[:2] + (-1,)),
                     b.reshape(b.shape[:2] + (-1,))) / 3
  want = (np.einsum('acbc->ab', full) / 3 - part("'Dense_1']['kernel'")
          + 1.5 * part("'Conv_0']['kernel'"))
  nngp = np.asarray(f(params, x1)) @ np.asarray(f(params, x2)).T / 3
  for impl in IMPLS[:3]:
    k = jax.jit(lambda a, b, p: empirical_kernels(
        f, p, a, b, ('nngp', 'ntk'), weights, implementation=impl))(
            x1, x2, params)
    assert_close(k.ntk, want)
    assert_close(k.nngp, nngp)
  sym = jax.jit(lambda a, p: empirical_kernels(f, p, a, None, 'ntk'))(
      x1, params)
  np.testing.assert_allclose(sym, sym.T, atol=1e-12)
  assert np.linalg.eigvalsh(np.asarray(sym)).min() > -1e-10


def test_rng_kwarg_split_as_nt():
  """`rng` reaches apply_fn as two keys, equal exactly when x1 == x2."""
  f0, params, x1, x2 = mlp_model()

  def f(p, x, rng):
    mask = jax.random.bernoulli(rng, 0.7, (x.shape[-1],))
    return f0(p, x * mask)
  key = jax.random.PRNGKey(3)
  got = jax.jit(iw.empirical_ntk_fn(f, implementation=3))(x1, None, params,
                                                          rng=key)
  g = lambda p, x: f(p, x, key)
  assert_close(got, np.einsum('acbc->ab', explicit_ntk(g, params, x1, x1)) / 4)


def _max_intermediate(fn, *args) -> int:
  """Largest array in the jaxpr of `fn` (recursing into inner jaxprs)."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  best = 0

  def walk(j):
    nonlocal best
    for eqn in j.eqns:
      for v in eqn.outvars:
        best = max(best, int(np.prod(v.aval.shape)) if hasattr(
            v.aval, 'shape') else 0)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return best


def test_structured_never_builds_weight_jacobians():
  # Wide dense layer: J for W is (N·C) × 64·64 entries.
  k = keys(3, 11)
  params = (jax.random.normal(k[0], (64, 64)), jax.random.normal(k[1], (64, 8)))
  f = lambda p, x: jnp.tanh(x @ p[0]) @ p[1]
  x = jax.random.normal(k[2], (6, 64))
  big = 6 * 8 * 64 * 64
  for impl, small in ((3, True), (1, False)):
    fn = iw.empirical_ntk_fn(f, vmap_axes=0, implementation=impl)
    m = _max_intermediate(lambda x, p: fn(x, None, p), x, params)
    assert (m < big // 8) == small, (impl, m)
  # Embedding with a large vocabulary (NT #199): nothing of size N·C·V·D.
  vocab = 5000
  emb = dict(e=jax.random.normal(k[0], (vocab, 8)),
             w=jax.random.normal(k[1], (8, 8)))
  g = lambda p, t: jnp.tanh(p['e'][t]).mean(1) @ p['w']
  t = jax.random.randint(k[1], (6, 7), 0, vocab)
  fn = iw.empirical_ntk_fn(g, vmap_axes=0, implementation=3)
  assert _max_intermediate(lambda t, p: fn(t, None, p), t, emb) < vocab * 8
  want = np.einsum('acbc->ab', explicit_ntk(g, emb, t, t)) / 8
  assert_close(fn(t, None, emb), want)


def test_auto_picks_structured_for_wide_mlp():
  from infwidth.empirical import ntk as ntk_module
  k = keys(3, 12)
  params = [jax.random.normal(k[0], (256, 256)),
            jax.random.normal(k[1], (256, 10))]
  f = lambda p, x: jnp.tanh(x @ p[0]) @ p[1]
  x = jax.random.normal(k[2], (8, 256))
  choice = ntk_module._choose_implementation(
      f, x, None, params, {}, (-1,), (), 0, None)
  assert choice == iw.NtkImplementation.STRUCTURED_DERIVATIVES


def test_structured_derivatives_of_a_pooled_flax_cnn():
  """Two convolutions with average pooling between them: a structured
  contraction with no pairwise order within the inputs' size (numpy's path
  then contracts several operands at once) still runs, and equals the
  Jacobian contraction."""
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3), param_dtype=x.dtype)(x)), (2, 2), (2, 2))
      x = nn.relu(nn.Conv(32, (3, 3), param_dtype=x.dtype)(x)).mean((1, 2))
      return nn.Dense(10, param_dtype=x.dtype)(x)

  x = jax.random.normal(jax.random.PRNGKey(0), (25, 8, 8, 1))
  model = CNN()
  params = model.init(jax.random.PRNGKey(1), x)
  f = lambda p, x: model.apply(p, x)
  ntk = lambda impl: iw.empirical_ntk_fn(f, vmap_axes=0, implementation=impl)(x, None, params)
  want = ntk(iw.NtkImplementation.JACOBIAN_CONTRACTION)
  got = ntk(iw.NtkImplementation.STRUCTURED_DERIVATIVES)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('same_inputs', [True, False])
def test_ntk_vector_product(same_inputs):
  # A linear model f(W, x) = x W has the NTK (x1 x2ᵀ) ⊗ I, so Θ·v = x1 x2ᵀ v.
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  x1 = jax.random.normal(k1, (4, 5))
  x2 = None if same_inputs else jax.random.normal(k2, (6, 5))
  xb = x1 if same_inputs else x2
  w = jax.random.normal(k3, (5, 3))
  v = jax.random.normal(k4, (xb.shape[0], 3))
  linear = lambda w, x: x @ w
  np.testing.assert_allclose(iw.empirical_ntk_vp_fn(linear, x1, x2, w)(v), x1 @ xb.T @ v,
                             rtol=1e-12)
  # A ReLU MLP: the product with the NTK that empirical_ntk_fn forms, jitted.
  init_fn, f, _ = iw.stax.serial(iw.stax.Dense(8), iw.stax.Relu(), iw.stax.Dense(3))
  _, params = init_fn(k3, x1.shape)
  ntk = iw.empirical_ntk_fn(f, trace_axes=())(x1, x2, params)   # (N1, N2, 3, 3)
  got = jax.jit(iw.empirical_ntk_vp_fn(f, x1, x2, params))(v)
  np.testing.assert_allclose(got, jnp.einsum('ijab,jb->ia', ntk, v), rtol=1e-10, atol=1e-12)

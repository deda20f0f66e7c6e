"""`Kernel` has NT's fields; `get` accepts every one of them, as NT's does; the
`diagonal_batch` / `diagonal_spatial` layouts of stax kernel functions against
Neural Tangents 0.6.5 (fixtures from tests/fixtures/make_kernel_layout_nt.py)."""

import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth import stax
from infwidth.kernel import FIELDS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'fixtures'))
from stax_architectures import INPUTS, LAYOUT_ARCHITECTURES  # noqa: E402

_NT = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'kernel_layout_nt.npz'))
_META = json.loads(str(_NT['meta']))

NT_FIELDS = ('nngp', 'ntk', 'cov1', 'cov2', 'x1_is_x2', 'is_gaussian', 'is_reversed',
             'is_input', 'diagonal_batch', 'diagonal_spatial', 'shape1', 'shape2',
             'batch_axis', 'channel_axis', 'mask1', 'mask2')


def _mlp():
  return stax.serial(stax.Dense(8, 1.3, 0.2), stax.Relu(), stax.Dense(1, 0.9, 0.1))


def test_fields_are_nts_in_nts_order():
  assert FIELDS == NT_FIELDS


def test_get_accepts_every_field_alone_and_in_tuples():
  _, apply_fn, kernel_fn = _mlp()
  x1, x2 = INPUTS['vec']()
  k = kernel_fn(x1, x2)
  for f in NT_FIELDS:
    one = kernel_fn(x1, x2, f)
    if isinstance(getattr(k, f), jax.Array):
      np.testing.assert_array_equal(one, getattr(k, f))
    else:
      assert one == getattr(k, f), f
  # NT's tests: shapes of the finite network's outputs come with the kernel.
  out = kernel_fn(x1, x2, ('nngp', 'shape1', 'shape2'))
  assert out._fields == ('nngp', 'shape1', 'shape2')
  assert out.shape1 == (3, 1) and out.shape2 == (2, 1)
  params = jax.eval_shape(lambda key: _mlp()[0](key, x1.shape)[1], jax.random.PRNGKey(0))
  assert jax.eval_shape(apply_fn, params, x1).shape == out.shape1
  every = kernel_fn(x1, x2, NT_FIELDS[::-1])
  assert every._fields == NT_FIELDS[::-1]
  np.testing.assert_array_equal(every.nngp, k.nngp)
  assert (every.is_gaussian, every.is_reversed, every.is_input) == (True, False, False)
  assert (every.diagonal_batch, every.diagonal_spatial) == (True, False)
  assert (every.batch_axis, every.channel_axis, every.mask1, every.mask2) == (0, 1, None, None)
  assert every.x1_is_x2 is False and kernel_fn(x1, None, 'x1_is_x2') is True
  # NT lower-cases `get`.
  np.testing.assert_array_equal(kernel_fn(x1, x2, 'NNGP'), k.nngp)
  assert kernel_fn(x1, x2, ['Cov1', 'ntk'])._fields == ('cov1', 'ntk')


@pytest.mark.parametrize('get, match', [('foo', 'Kernel field'), ((), 'non-empty'),
                                        (('nngp', 'NNGP'), 'unique')])
def test_bad_get_is_a_clear_error(get, match):
  x1, x2 = INPUTS['vec']()
  with pytest.raises(iw.InfwidthError, match=match):
    _mlp()[2](x1, x2, get)


def test_static_fields_under_jit():
  _, _, kernel_fn = _mlp()
  x1, x2 = INPUTS['vec']()
  jitted = jax.jit(kernel_fn, static_argnames='get')
  get = ('nngp', 'shape1', 'shape2', 'is_gaussian', 'x1_is_x2', 'diagonal_spatial', 'mask1',
         'batch_axis', 'channel_axis', 'cov2')
  out = jitted(x1, x2, get)
  eager = kernel_fn(x1, x2, get)
  np.testing.assert_allclose(out.nngp, eager.nngp, rtol=1e-12)
  assert tuple(int(d) for d in out.shape1) == (3, 1)
  assert bool(out.is_gaussian) and not bool(out.x1_is_x2) and out.mask1 is None
  assert int(out.channel_axis) == 1
  k = jitted(x1, None)
  assert isinstance(k, iw.Kernel) and k.x1_is_x2 and k.cov2 is None and k.is_gaussian


def test_kernel_accepts_nts_arguments():
  nngp = jnp.eye(2)
  kw = dict(nngp=nngp, ntk=2 * nngp, cov1=jnp.ones(2), cov2=None, x1_is_x2=jnp.array(True),
            is_gaussian=True, is_reversed=False, is_input=False, diagonal_batch=True,
            diagonal_spatial=False, shape1=[2, 3], shape2=(2, 3), batch_axis=0,
            channel_axis=1, mask1=None, mask2=None)
  k = iw.Kernel(**kw)
  assert k.x1_is_x2 is True and k.shape1 == (2, 3)
  assert k == iw.Kernel(*kw.values())  # NT's positional order.
  assert list(k.asdict()) == list(NT_FIELDS)
  assert len(k.astuple()) == len(NT_FIELDS)
  leaves, treedef = jax.tree_util.tree_flatten(k)
  assert len(leaves) == 3  # nngp, ntk, cov1: the static fields are not leaves.
  # Defaults are NT's layout of a kernel with no spatial axes.
  d = iw.Kernel(nngp)
  assert (d.diagonal_batch, d.diagonal_spatial, d.is_gaussian, d.is_reversed) == (
      True, False, False, False)
  # Kernels compose: a Kernel with NT's fields feeds the next kernel function.
  x1, x2 = INPUTS['vec']()
  net1 = stax.serial(stax.Dense(8, 1.4, 0.2), stax.Relu())
  net2 = stax.serial(stax.Dense(8, 1.1, 0.3), stax.Erf(), stax.Dense(1, 1., 0.1))
  k1 = net1[2](x1, x2)
  assert not k1.is_gaussian
  np.testing.assert_allclose(net2[2](k1, get='nngp'),
                             stax.serial(net1, net2)[2](x1, x2, 'nngp'), rtol=1e-10)


def test_fallback_kernel_has_valid_fields():
  w = iw.ParamStats(0., 1.)

  def net(p, x):
    h = jax.nn.relu(x @ p['w0'] / np.sqrt(x.shape[-1]))
    h = jnp.cumsum(h[..., None], axis=-1)[..., 0]  # no kernel rule
    return h @ p['w1'] / np.sqrt(h.shape[-1])

  params = {'w0': jnp.ones((5, 16)), 'w1': jnp.ones((16, 3))}
  kf = iw.kernelize(net, params, param_stats={'w0': w, 'w1': w}, fallback='empirical')
  x1, x2 = INPUTS['vec']()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    k = kf(x1, x2)
    fields = kf(x1, x2, ('shape1', 'shape2', 'is_gaussian', 'diagonal_batch', 'cov1'))
  assert isinstance(k, iw.Kernel)
  assert (k.shape1, k.shape2) == ((3, 3), (2, 3))  # the outputs', not the inputs'
  assert fields.shape1 == (3, 3) and fields.diagonal_batch and not fields.is_gaussian
  assert fields.cov1.shape == (3,)


# diagonal_batch / diagonal_spatial against NT.

_DEFAULT = ('mlp', 'mlp_relu_out', 'layernorm_out', 'conv1d_out')
_ARCHS = [n if n in _DEFAULT else pytest.param(n, marks=pytest.mark.slow)
          for n in LAYOUT_ARCHITECTURES]
_FLAGS = (None, True, False)


def _layout_cases(name):
  for same in (False, True):
    for ds in (None, False, True):  # the full kernels first (compared with below)
      for db in _FLAGS:
        yield same, ds, db, f'{name}|{"same" if same else "pair"}|ds={ds}|db={db}'


@pytest.mark.parametrize('name', _ARCHS)
def test_layouts_match_nt(name):
  """Every combination of the flags, both with x2 and x2=None: NT's static
  fields, shapes and values. Where NT cannot compute a diagonal_spatial kernel
  (a pooling needs the full spatial covariance; NT raises) infwidth returns
  the diagonal of the full kernel."""
  expr, inputs = LAYOUT_ARCHITECTURES[name]
  kernel_fn = eval(expr, dict(vars(stax), jnp=jnp))[2]  # noqa: S307
  x1, x2 = INPUTS[inputs]()
  full = {}
  for same, ds, db, key in _layout_cases(name):
    k = kernel_fn(x1, None if same else x2, None, diagonal_spatial=ds, diagonal_batch=db)
    meta = _META[key]
    if 'error' in meta:
      assert ds is True and 'diagonal_spatial' in meta['error']
      ref = full[same, db is not False]
      nsp = (ref.nngp.ndim - 2) // 2
      np.testing.assert_allclose(k.nngp, _spatial_diag(ref.nngp, 2, nsp), rtol=1e-12)
      np.testing.assert_allclose(k.cov1, _spatial_diag(ref.cov1, 1 if db is not False else 2,
                                                       nsp), rtol=1e-12)
      continue
    if ds is False:
      full[same, db is not False] = k
    for f, want in meta.items():
      got = getattr(k, f)
      if f == 'is_reversed':
        assert got is False  # infwidth never reverses; NT's arrays are stored un-reversed.
        continue
      assert (list(got) if isinstance(got, tuple) else got) == want, (key, f, got, want)
    for f in ('nngp', 'ntk', 'cov1', 'cov2'):
      if f'{key}|{f}' in _NT.files:
        ref = _NT[f'{key}|{f}']
        got = np.asarray(getattr(k, f))
        assert got.shape == ref.shape, (key, f)
        np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max(),
                                   err_msg=f'{key} {f}')
      elif ds is not None and db is not None:
        assert getattr(k, f) is None, (key, f)


def _spatial_diag(a, nb, nsp):
  a = np.asarray(a)
  for i in range(nsp):
    a = np.moveaxis(np.diagonal(a, axis1=nb + i, axis2=nb + i + 1), -1, nb + i)
  return a


def test_layout_get_and_jit():
  """The flags select NT's shapes also through `get` and under `jax.jit`."""
  expr, inputs = LAYOUT_ARCHITECTURES['conv1d_out']
  kernel_fn = eval(expr, dict(vars(stax), jnp=jnp))[2]  # noqa: S307
  x1, x2 = INPUTS[inputs]()
  jitted = jax.jit(kernel_fn, static_argnames=('get', 'diagonal_batch', 'diagonal_spatial'))
  out = jitted(x1, x2, ('nngp', 'cov1', 'cov2', 'diagonal_spatial'), diagonal_spatial=True,
               diagonal_batch=False)
  key = 'conv1d_out|pair|ds=True|db=False'
  for f in ('nngp', 'cov1', 'cov2'):
    np.testing.assert_allclose(getattr(out, f), _NT[f'{key}|{f}'], rtol=1e-7)
  assert bool(out.diagonal_spatial)
  assert kernel_fn(x1, None, 'nngp', diagonal_spatial=True).shape == (2, 2, 3)


def test_layout_of_composed_kernels():
  """A Kernel with diagonal_batch=False feeds the next kernel function; its
  full-batch covariances give the next full-batch covariances."""
  x1, x2 = INPUTS['vec']()
  net1 = stax.serial(stax.Dense(8, 1.4, 0.2), stax.Relu())
  net2 = stax.serial(stax.Dense(8, 1.1, 0.3), stax.Erf(), stax.Dense(1, 1., 0.1))
  whole = stax.serial(net1, net2)[2](x1, x2, diagonal_batch=False)
  k1 = net1[2](x1, x2, diagonal_batch=False)
  assert k1.cov1.shape == (3, 3) and k1.cov2.shape == (2, 2)
  composed = net2[2](k1, diagonal_batch=False)
  for f in ('nngp', 'ntk', 'cov1', 'cov2'):
    np.testing.assert_allclose(getattr(composed, f), getattr(whole, f), rtol=1e-10)
  # Per-input covariances of a composed kernel need nothing more.
  np.testing.assert_allclose(net2[2](k1, get='cov1'), np.diagonal(whole.cov1), rtol=1e-10)
  with pytest.raises(iw.InfwidthError, match='diagonal_batch=False'):
    net2[2](net1[2](x1, x2), diagonal_batch=False)

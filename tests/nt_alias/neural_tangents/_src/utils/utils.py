"""The shape helpers Neural Tangents' tests use to build their expected values
(`zip_flat`, `unzip_axes`, `axis_after_dot`, `canonicalize_idx`), written
anew: they are part of the tests, not of what is tested. Anything else from
`neural_tangents._src.utils.utils` is a stand-in that raises."""

from neural_tangents._src._private import missing


def zip_flat(x, y):
  return tuple(c for xy in zip(x, y) for c in xy)


def unzip_axes(x, start_axis=0, end_axis=None):
  """`[..., X, X', Y, Y', ...] -> [..., X, Y, ..., X', Y', ...]` from `start_axis`."""
  end_axis = x.ndim if end_axis is None else end_axis
  axes = list(range(start_axis, end_axis))
  perm = list(range(start_axis)) + axes[0::2] + axes[1::2] + list(range(end_axis, x.ndim))
  return x.transpose(perm)


def axis_after_dot(axis, contracting_dims, batch_dims, lhs_ndim=None):
  if axis in batch_dims:
    return batch_dims.index(axis)
  return (axis - sum(1 for i in contracting_dims if i < axis)
          + sum(1 for i in batch_dims if i > axis)
          + (0 if lhs_ndim is None else lhs_ndim - len(batch_dims) - len(contracting_dims)))


def canonicalize_idx(idx, ndim):
  if idx is Ellipsis or isinstance(idx, (int, slice)):
    idx = (idx,) + (slice(None),) * (ndim - 1)
  for i, s in enumerate(idx):
    if s is Ellipsis:
      idx = idx[:i] + (slice(None),) * (ndim - len(idx) + 1) + idx[i + 1:]
  return idx + (slice(None),) * (ndim - len(idx))


def __getattr__(name):
  return missing('utils', name)


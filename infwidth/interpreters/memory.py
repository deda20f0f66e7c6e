"""The memory a kernel computation needs, estimated from its jaxpr before it runs.

`peak_bytes(jaxpr)` walks the equations in order, keeping the arrays that are
still to be read (their last use), and returns the largest total at any
equation: what op-by-op evaluation holds at once. Calls (`jit`,
`custom_jvp_call`, loops) add the peak of their own body beyond its inputs
and outputs. XLA's fusion under `jit` only lowers the true peak, so this is
an upper estimate; `benchmarks/bench_memory_estimate.py` compares it with
measured peaks.

`check_fits` raises `KernelMemoryError` when the estimate exceeds the memory
available to the default device, naming `infwidth.batch` with a batch size
whose tiles fit.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import jax
from jax.extend.core import Jaxpr, Literal

from infwidth.domain.errors import InfwidthError
from infwidth.interpreters.walker import sub_jaxprs

#: Bytes the kernel computation may use; None: detected (`available_bytes`).
LIMIT_BYTES: Optional[int] = None
#: Share of the available memory a computation may plan to use.
USABLE_FRACTION = 0.8


class KernelMemoryError(InfwidthError):
  """A kernel computation would need more memory than the device has."""


def _bytes(v) -> int:
  aval = getattr(v, 'aval', None)
  shape = getattr(aval, 'shape', None)
  if shape is None or isinstance(v, Literal):
    return 0
  return math.prod(shape) * aval.dtype.itemsize


def peak_bytes(jaxpr: Jaxpr, fused: bool = False) -> int:
  """Largest total size of the arrays alive at once while `jaxpr` runs
  equation by equation (its inputs included).

  `fused`: as one compiled program, whose elementwise equations XLA fuses
  into their consumers: their results take memory only where they leave the
  fusion (read by another kind of equation, or returned).
  """
  last_use, stored = {}, set()
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not isinstance(v, Literal):
        last_use[v] = i
        if not _elementwise(eqn):
          stored.add(v)
  outputs = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
  stored |= outputs
  size = lambda v, eqn: _bytes(v) if not (fused and _elementwise(eqn) and v not in stored) else 0
  live = {v: _bytes(v) for v in list(jaxpr.constvars) + list(jaxpr.invars)}
  total = sum(live.values())
  peak = total
  for i, eqn in enumerate(jaxpr.eqns):
    out = sum(size(v, eqn) for v in eqn.outvars)
    inner = max((_temporary_bytes(sub, fused) for sub in sub_jaxprs(eqn)), default=0)
    peak = max(peak, total + out + inner)
    for v in eqn.outvars:
      live[v] = size(v, eqn)
      total += live[v]
    for v in eqn.invars:
      if not isinstance(v, Literal) and last_use.get(v) == i and v not in outputs and v in live:
        total -= live.pop(v)
  return peak


def _temporary_bytes(jaxpr: Jaxpr, fused: bool) -> int:
  """A body's peak beyond its inputs and outputs (counted by the caller)."""
  io = sum(_bytes(v) for v in list(jaxpr.invars) + list(jaxpr.constvars) + list(jaxpr.outvars))
  return max(0, peak_bytes(jaxpr, fused) - io)


def _elementwise(eqn) -> bool:
  """Whether XLA fuses the equation into its consumer: elementwise and
  broadcasting maps, and calls of nothing else."""
  name = eqn.primitive.name
  if name in _FUSIBLE:
    return True
  if name not in _CALLS:
    return False
  subs = list(sub_jaxprs(eqn))
  return bool(subs) and all(_elementwise(e) for sub in subs for e in sub.eqns)


_CALLS = frozenset(('pjit', 'jit', 'closed_call', 'core_call', 'custom_jvp_call',
                    'custom_vjp_call', 'custom_vjp_call_jaxpr', 'remat', 'checkpoint'))


_FUSIBLE = frozenset((
    'abs', 'acos', 'add', 'and', 'asin', 'atan', 'atan2', 'broadcast_in_dim', 'ceil', 'clamp',
    'convert_element_type', 'copy', 'cos', 'cosh', 'div', 'eq', 'erf', 'erf_inv', 'erfc', 'exp',
    'exp2', 'expm1', 'floor', 'ge', 'gt', 'integer_pow', 'is_finite', 'le', 'log', 'log1p',
    'logistic', 'lt', 'max', 'min', 'mul', 'ne', 'neg', 'nextafter', 'not', 'or', 'pow',
    'reshape', 'round', 'rsqrt', 'select_n', 'sign', 'sin', 'sinh', 'sqrt', 'square',
    'squeeze', 'sub', 'tan', 'tanh', 'xor', 'expand_dims', 'iota'))


def output_bytes(jaxpr: Jaxpr) -> int:
  return sum(_bytes(v) for v in jaxpr.outvars)


def available_bytes() -> Optional[int]:
  """Memory free for computation on the default device, or None if unknown:
  an accelerator's free memory, or the host's (its cgroup limit included)."""
  if LIMIT_BYTES is not None:
    return int(LIMIT_BYTES)
  device = jax.devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    if 'bytes_limit' in stats:
      return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
    return None
  free = _meminfo_available()
  limit = _cgroup_free()
  candidates = [b for b in (free, limit) if b is not None]
  return min(candidates) if candidates else None


def _meminfo_available() -> Optional[int]:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return None


def _cgroup_free() -> Optional[int]:
  try:
    with open('/sys/fs/cgroup/memory.max') as f:
      text = f.read().strip()
    if text == 'max':
      return None
    with open('/sys/fs/cgroup/memory.current') as f:
      return int(text) - int(f.read().strip())
  except (OSError, ValueError):
    return None


def _gb(b: float) -> str:
  return f'{b / 2 ** 30:.3g} GiB'


def check_fits(peak: int, out: int, n1: int, n2: int) -> None:
  """Raises `KernelMemoryError` if a computation of estimated `peak` bytes
  (`out` of them its results) for `n1 × n2` input pairs does not fit.

  The suggested `batch_size` b makes a tile's share of the rest,
  `(peak - out)·b²/(n1·n2)`, fit in what the results leave free.
  """
  avail = available_bytes()
  if avail is None or peak <= USABLE_FRACTION * avail:
    return
  usable = USABLE_FRACTION * avail
  head = (f'the kernel of {n1} x {n2} inputs needs about {_gb(peak)} of memory '
          f'({_gb(out)} of it for the results), more than the {_gb(avail)} available')
  per_pair = max(peak - out, 1) / max(n1 * n2, 1)
  out_per_pair = out / max(n1 * n2, 1)
  if out <= usable / 2:
    b = _tile(usable - out, per_pair, max(n1, n2))
    raise KernelMemoryError(
        f'{head}. Compute it in tiles with infwidth.batch(kernel_fn, batch_size={b}): '
        f'tiles of {b} x {b} inputs need about {_gb(per_pair * b * b)} each.')
  # The results alone take most of the memory: in parts of x1's rows.
  rows = max(1, int(usable / 2 / max(out_per_pair * n2, 1)))
  b = _tile(usable / 2, per_pair, max(min(rows, n1), 1))
  raise KernelMemoryError(
      f'{head}; the results alone do not fit. Compute them in parts, for example x1 in '
      f'slices of {rows} rows, each with infwidth.batch(kernel_fn, batch_size={b}) '
      f'({_gb(out_per_pair * rows * n2)} of results per slice; on an accelerator, '
      'store_on_device=False keeps the results in host memory).')


def _tile(room: float, per_pair: float, most: int) -> int:
  """The largest power of two b ≤ `most` with `per_pair`·b² ≤ `room`."""
  b = min(int(math.sqrt(max(room, 0) / per_pair)), most)
  return 2 ** int(math.log2(b)) if b >= 1 else 1

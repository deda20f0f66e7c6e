"""`neural_tangents._src.batching`: the public `batch` is infwidth's; NT's
private helpers (`_serial`, `_parallel`, `_jit_or_pmap_broadcast`) are
stand-ins that raise."""

from infwidth import batch  # noqa: F401
from neural_tangents._src._private import missing


def __getattr__(name):
  return missing('batching', name)

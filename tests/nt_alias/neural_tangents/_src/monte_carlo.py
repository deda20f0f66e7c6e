"""`neural_tangents._src.monte_carlo`: the public `monte_carlo_kernel_fn` is
infwidth's; NT's private `_sample_once_kernel_fn` is a stand-in that raises."""

from infwidth import monte_carlo_kernel_fn  # noqa: F401
from neural_tangents._src._private import missing


def __getattr__(name):
  return missing('monte_carlo', name)

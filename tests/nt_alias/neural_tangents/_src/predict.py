"""`neural_tangents._src.predict`: NT's private `_is_on_cpu` is a stand-in
that raises; everything public is in `neural_tangents.predict`."""

from infwidth.predict import *  # noqa: F401,F403
from neural_tangents._src._private import missing


def __getattr__(name):
  return missing('predict', name)

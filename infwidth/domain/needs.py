"""What of a value's second moments a computation needs (DESIGN §5)."""

from __future__ import annotations

import enum


class Need(enum.IntEnum):
  """What of a value's second moments is needed, least first.

  BATCH_DIAGONAL: each input with itself only (per-input statistics, such as
    the channel means of LayerNorm).
  PIXEL_DIAGONAL: pairs of inputs at equal spatial positions only (`N² d`
    entries instead of `N² d²`).
  FULL: pairs of inputs at every pair of positions.
  """
  BATCH_DIAGONAL = 0
  PIXEL_DIAGONAL = 1
  FULL = 2

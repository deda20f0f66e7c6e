"""The Monte Carlo check shared by the tests of whole networks (DESIGN §6)."""

import numpy as np


def check_against_mc(analytic, draws, n_hidden, width, k_se, c_width, per_entry=True):
  """|mean(draws) - analytic| ≤ k·SE + c·L/n·max|analytic|, entrywise.

  `draws`: `(S, *analytic.shape)` kernels of `S` finite networks of `width`
  with `n_hidden` hidden layers. Non-vacuity: the tolerance is below 15% of
  each diagonal entry (`per_entry`), or of their mean (spatial kernels,
  whose border pixels have small variances next to the global width term).
  """
  draws = np.asarray(draws, np.float64)
  analytic = np.asarray(analytic, np.float64)
  assert draws.shape[1:] == analytic.shape, (draws.shape, analytic.shape)
  mean = draws.mean(0)
  se = draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
  scale = np.abs(analytic).max()
  tol = k_se * se + c_width * n_hidden / width * scale
  err = np.abs(mean - analytic)
  assert np.all(err <= tol), (
      f'max err/tol = {np.max(err / tol):.3f}; err {err.max():.3g}, se {se.max():.3g}, '
      f'scale {scale:.3g}')
  # Non-vacuous: the tolerance would catch a kernel 15% off on the diagonal.
  n = analytic.shape[0]
  diag = analytic[np.arange(n), np.arange(n)]
  tol_diag = tol[np.arange(n), np.arange(n)]
  if per_entry:
    assert np.all(tol_diag < 0.15 * np.abs(diag)), np.max(tol_diag / np.abs(diag))
  else:
    assert tol_diag.mean() < 0.15 * np.abs(diag).mean()

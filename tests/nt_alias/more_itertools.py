"""The one `more_itertools` function Neural Tangents' tests use (`powerset`),
so that they run without that package."""

import itertools


def powerset(iterable):
  s = list(iterable)
  return itertools.chain.from_iterable(itertools.combinations(s, r) for r in range(len(s) + 1))

"""Stand-ins for Neural Tangents' private helpers that infwidth has no
counterpart for: importing one works, calling it raises, so only the tests of
that helper fail (and say why)."""


def missing(module, name):
  if name.startswith('__'):
    raise AttributeError(name)

  def helper(*args, **kwargs):
    raise NotImplementedError(f'NT-private helper {module}.{name} has no infwidth counterpart')

  helper.__name__ = name
  return helper

"""`neural_tangents.stax` served by `infwidth.stax`. A name infwidth does not
have yet resolves to a stand-in: calling it gives a layer whose functions
raise `NotImplementedError`, and its attributes (enum members) are stand-ins
too, so that a test file still collects and only the tests using it fail."""

import infwidth.stax as _stax

globals().update({k: getattr(_stax, k) for k in dir(_stax) if not k.startswith('_')})


class _Missing:

  def __init__(self, name):
    self._name = name

  def _raise(self, *args, **kwargs):
    raise NotImplementedError(f'infwidth.stax has no {self._name}')

  def __call__(self, *args, **kwargs):
    return _stax.Layer(self._raise, self._raise, self._raise)

  def __getattr__(self, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    return _Missing(f'{self._name}.{attr}')


def __getattr__(name):
  if name.startswith('__'):
    raise AttributeError(name)
  return _Missing(name)

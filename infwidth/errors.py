"""Errors raised by infwidth (see `infwidth.domain.errors` for the taxonomy)."""

from infwidth.domain.errors import (InfwidthError, InternalError,  # noqa: F401
                                    UnsupportedPrimitiveError, UnsupportedValueError)

__all__ = ['InfwidthError', 'InternalError', 'UnsupportedPrimitiveError',
           'UnsupportedValueError']

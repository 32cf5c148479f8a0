"""Placeholder: PSSD is being implemented."""

from ._base import AbstractSpace

__all__ = ["PSSD"]


class PSSD(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("PSSD is not implemented yet")

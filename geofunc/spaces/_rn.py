"""Placeholder: Rn is being implemented."""

from ._base import AbstractSpace

__all__ = ["Rn"]


class Rn(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Rn is not implemented yet")

"""Placeholder: AlmostOrthogonal is being implemented."""

from ._base import AbstractSpace

__all__ = ["AlmostOrthogonal"]


class AlmostOrthogonal(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("AlmostOrthogonal is not implemented yet")

"""Placeholder: FixedRank is being implemented."""

from ._base import AbstractSpace

__all__ = ["FixedRank"]


class FixedRank(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("FixedRank is not implemented yet")

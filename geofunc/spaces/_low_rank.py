"""Placeholder: LowRank is being implemented."""

from ._base import AbstractSpace

__all__ = ["LowRank"]


class LowRank(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("LowRank is not implemented yet")

"""Placeholder: Skew is being implemented."""

from ._base import AbstractSpace

__all__ = ["Skew"]


class Skew(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Skew is not implemented yet")

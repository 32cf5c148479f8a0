"""Placeholder: PSD is being implemented."""

from ._base import AbstractSpace

__all__ = ["PSD"]


class PSD(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("PSD is not implemented yet")

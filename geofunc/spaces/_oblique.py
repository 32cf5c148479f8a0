"""Placeholder: Oblique is being implemented."""

from ._base import AbstractSpace

__all__ = ["Oblique"]


class Oblique(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Oblique is not implemented yet")

"""Placeholder: Stiefel is being implemented."""

from ._base import AbstractSpace

__all__ = ["Stiefel"]


class Stiefel(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Stiefel is not implemented yet")

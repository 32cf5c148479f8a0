"""Placeholder: Grassmannian is being implemented."""

from ._base import AbstractSpace

__all__ = ["Grassmannian"]


class Grassmannian(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Grassmannian is not implemented yet")

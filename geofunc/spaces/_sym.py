"""Placeholder: Sym is being implemented."""

from ._base import AbstractSpace

__all__ = ["Sym"]


class Sym(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Sym is not implemented yet")

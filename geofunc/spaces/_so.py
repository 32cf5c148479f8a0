"""Placeholder: SO is being implemented."""

from ._base import AbstractSpace

__all__ = ["SO"]


class SO(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("SO is not implemented yet")

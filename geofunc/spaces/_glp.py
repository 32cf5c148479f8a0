"""Placeholder: GLp is being implemented."""

from ._base import AbstractSpace

__all__ = ["GLp"]


class GLp(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("GLp is not implemented yet")

"""Placeholder: Sphere is being implemented."""

from ._base import AbstractSpace

__all__ = ["Sphere"]


class Sphere(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Sphere is not implemented yet")

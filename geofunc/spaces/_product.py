"""Placeholder: Product is being implemented."""

from ._base import AbstractSpace

__all__ = ["Product"]


class Product(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Product is not implemented yet")

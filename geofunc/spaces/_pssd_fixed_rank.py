"""Placeholder: PSSDFixedRank is being implemented."""

from ._base import AbstractSpace

__all__ = ["PSSDFixedRank"]


class PSSDFixedRank(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("PSSDFixedRank is not implemented yet")

"""Placeholder: PSSDLowRank is being implemented."""

from ._base import AbstractSpace

__all__ = ["PSSDLowRank"]


class PSSDLowRank(AbstractSpace):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("PSSDLowRank is not implemented yet")

"""``torch.nn.utils.parametrize`` under the name GeoTorch's examples use (``geotorch.parametrize``).

``geofunc.nn.parametrize.cached()`` evaluates every parametrized tensor at most once inside the
block (an RNN's time loop, weight sharing); gradients flow through the cached value. The rest is
PyTorch's own API, re-exported unchanged: ``register_parametrization``, ``is_parametrized``,
``remove_parametrizations``, ``type_before_parametrizations``,
``transfer_parametrizations_and_params``, ``ParametrizationList``. (``transfer_parametrizations_and_params``
registers the source's parametrization object itself on the target; a geofunc class holds one tensor's
base and refuses a second tensor with ``ManifoldError``: deep-copy the module, or constrain the target
and load the source's ``state_dict``.)

Example::

    >>> import geofunc.nn as geotorch
    >>> layer = geotorch.orthogonal(torch.nn.Linear(4, 4))
    >>> with geotorch.parametrize.cached():
    ...     W = layer.weight
    ...     W is layer.weight
    True
"""

from torch.nn.utils.parametrize import (
    ParametrizationList as ParametrizationList,
    cached as cached,
    is_parametrized as is_parametrized,
    register_parametrization as register_parametrization,
    remove_parametrizations as remove_parametrizations,
    transfer_parametrizations_and_params as transfer_parametrizations_and_params,
    type_before_parametrizations as type_before_parametrizations,
)

__all__ = [
    "ParametrizationList",
    "cached",
    "is_parametrized",
    "register_parametrization",
    "remove_parametrizations",
    "transfer_parametrizations_and_params",
    "type_before_parametrizations",
]

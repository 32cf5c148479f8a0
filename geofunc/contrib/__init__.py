"""``geofunc.contrib``: bridges to other libraries, each imported only when asked for.

* :mod:`geofunc.contrib.zuko`: linear layers of normalizing flows built from geofunc spaces, as
  transforms of zuko (github.com/probabilists/zuko; needs the ``flows`` extra,
  ``python -m pip install -e ".[flows]"``).
* :mod:`geofunc.contrib.geoopt`: the geofunc spaces of geoopt's manifolds, and the ``constraints``
  of a model built with ``geoopt.ManifoldParameter`` s (geoopt itself is not imported).

Nothing here is imported by ``import geofunc``.
"""

"""``geofunc.contrib``: bridges to other libraries, each imported only when asked for.

* :mod:`geofunc.contrib.zuko`: linear layers of normalizing flows built from geofunc spaces, as
  transforms of zuko (github.com/probabilists/zuko; needs the ``flows`` extra,
  ``python -m pip install -e ".[flows]"``).

Nothing here is imported by ``import geofunc``.
"""

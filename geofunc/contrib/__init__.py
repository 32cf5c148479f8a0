"""``geofunc.contrib``: bridges to other libraries, each imported only when asked for.

* :mod:`geofunc.contrib.zuko`: linear layers of normalizing flows built from geofunc spaces, as
  transforms of zuko (github.com/probabilists/zuko; needs ``pip install geofunc[flows]``).

Nothing here is imported by ``import geofunc``.
"""

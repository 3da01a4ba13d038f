"""The vehicle core: state, subscriptions, routing and encoding (no I/O).

`Core` runs the compiled kernels; `ReferenceCore` (in _reference) runs the
numpy-only ones that the tests use as the oracle. Both share CoreBase.
"""
try:
    # both compiled modules: hub and the WebSocket transport import _fanout
    from . import _core as _kernel
    from . import _fanout  # noqa: F401
    from . import _ingest  # noqa: F401
except ImportError as e:  # a checkout whose extensions were never built
    import importlib.machinery as _m
    import os as _os
    _here = _os.path.dirname(__file__)
    _built = all(any(_os.path.exists(_os.path.join(_here, n + sfx)) for sfx in _m.EXTENSION_SUFFIXES)
                 for n in ("_core", "_fanout", "_ingest"))
    raise ImportError(
        f"realtime's compiled core does not load ({e}): rebuild it with `make build`, "
        "or reinstall with `pip install .`" if _built else
        "realtime's compiled core (realtime/_core/_core and _fanout) is not built. In a checkout "
        "run `make build` (or `python setup.py build_ext --inplace`); to install the server, run "
        "`pip install .`") from None

import numpy as np

from ._base import CLIENT_DTYPE, CoreBase, TickPending
from ._schema import FMT_JSON, FMT_MSGPACK, VEHICLE_DTYPE, UpdateBatch


class Core(CoreBase):
    """The production core: CoreBase with the Cython kernels."""

    def _k_apply(self, rows, batch):
        return _kernel.k_apply(self, rows, batch)

    def _k_client_diff(self, c, full_all):
        return _kernel.k_client_diff(self, c, full_all)

    def _k_tick(self, rebuild, rows):
        return _kernel.k_tick(self, rebuild, rows)

    def mirror_rows(self, xlate, orows, recs, types):
        return _kernel.k_mirror(self, xlate, orows, recs.view(np.uint8), types)


__all__ = ["Core", "CoreBase", "CLIENT_DTYPE", "TickPending", "UpdateBatch",
           "VEHICLE_DTYPE", "FMT_JSON", "FMT_MSGPACK"]

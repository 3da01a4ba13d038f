"""The vehicle core: state, subscriptions, routing and encoding (no I/O).

`Core` runs the compiled kernels; `ReferenceCore` (in _reference) runs the
numpy-only ones that the tests use as the oracle. Both share CoreBase.
"""
from . import _core as _kernel
from ._base import CLIENT_DTYPE, CoreBase, TickPending
from ._schema import FMT_JSON, FMT_MSGPACK, VEHICLE_DTYPE, UpdateBatch


class Core(CoreBase):
    """The production core: CoreBase with the Cython kernels."""

    def _k_apply(self, rows, batch):
        return _kernel.k_apply(self, rows, batch)

    def _k_client_diff(self, c, full_all):
        return _kernel.k_client_diff(self, c, full_all)

    def _k_tick(self, rebuild=True):
        return _kernel.k_tick(self, rebuild)


__all__ = ["Core", "CoreBase", "CLIENT_DTYPE", "TickPending", "UpdateBatch",
           "VEHICLE_DTYPE", "FMT_JSON", "FMT_MSGPACK"]

"""Two workers that do not collude: the `-2w` modes' transport (`TwoWorkerTransport`).

The *worker* computes each layer on the masked input, op(x + r, W''); the *mask worker*
computes the same layer on the mask alone, u = op(r, W''), during the same call, so the master
makes no product for its masks. Both hold the same published weights (published to both).
Each alone receives a tensor independent of the input: the worker a payload uniform on the
masks' grid whatever x is (`groupcover.masks`), the mask worker the uniform mask r itself.
Together they have x = (x + r) - r: the modes protect the input only if the two never
exchange what they receive. That is an assumption about who runs them, which nothing here can
check: the results of these modes say so (`groupcover.modes.TWO_WORKER_LABEL`).

The worker's session is the primary one: its timings are this transport's, its observers see
what it receives. The mask worker's session keeps its own timings and observers (the
benchmark adds its calls and bytes to each forward's, and its audit is a second `Audit`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future

import torch

from groupcover.errors import GroupCoverError
from groupcover.transport import LayerOp, Observer, PublishedRef, Transport


class TwoWorkerTransport(Transport):
    """The worker's session (`primary`) with the mask worker's beside it (`mask_transport`)."""

    def __init__(self, primary: Transport, mask_transport: Transport) -> None:
        super().__init__()
        self.primary = primary
        self.mask_transport = mask_transport
        self.timings = primary.timings  # the forward's breakdown is the worker's

    @property
    def worker_name(self) -> str:
        return _name(self.primary)

    @property
    def mask_worker_name(self) -> str:
        return _name(self.mask_transport)

    @property
    def published_bytes(self) -> int:
        return sum(int(getattr(t, "published_bytes", 0)) for t in self._both())

    @property
    def published_by_reference(self) -> int | None:
        return getattr(self.primary, "published_by_reference", None)

    def _both(self) -> tuple[Transport, Transport]:
        return self.primary, self.mask_transport

    def add_observer(self, observer: Observer) -> None:
        self.primary.add_observer(observer)

    def publish(self, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        for transport in self._both():
            transport.publish(layer_id, weight, op)

    def publish_ref(
        self,
        layer_id: str,
        ref: PublishedRef,
        op: LayerOp,
        load: Callable[[], torch.Tensor],
        dtype: torch.dtype,
    ) -> None:
        for transport in self._both():
            transport.publish_ref(layer_id, ref, op, load, dtype)

    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        return self.primary.run_async(layer_id, x)

    def worker_peak_rss(self) -> int | None:
        ask = getattr(self.primary, "worker_peak_rss", None)
        return None if ask is None else ask()

    def close(self) -> None:
        """Closes both sessions; the first failure is the one raised."""
        failure: GroupCoverError | None = None
        for transport in self._both():
            try:
                transport.close()
            except GroupCoverError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


def _name(transport: Transport) -> str:
    for attribute in ("worker_name", "label"):
        value = getattr(transport, attribute, None)
        if isinstance(value, str) and value:
            return value
    return type(transport).__name__


def open_pair(
    open_worker: Callable[[], Transport], open_mask_worker: Callable[[], Transport]
) -> TwoWorkerTransport:
    """Both sessions, or neither: the worker's is closed if the mask worker's cannot open."""
    primary = open_worker()
    try:
        return TwoWorkerTransport(primary, open_mask_worker())
    except BaseException:
        with contextlib.suppress(GroupCoverError):
            primary.close()
        raise

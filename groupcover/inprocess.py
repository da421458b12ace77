"""`InProcessTransport`: the worker's store in the master's own process (tests, attacks, the
TEE-only baselines); the same Transport interface and bookkeeping as the wire, no link."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from groupcover.layer_op import LayerOp
from groupcover.transport import Transport, payload_bytes
from groupcover.worker import WorkerState

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    """The worker's store lives in this process; tensors are still copied both ways.

    Copies on send and receive mean that a protocol which mutates a tensor after handing it over,
    or mutates a result it got back, behaves here as it would over the wire. Timings are
    recorded as for every transport, with a zero-cost link.
    """

    def __init__(self, state: WorkerState | None = None, owner: str = "inprocess") -> None:
        super().__init__()
        self.state = state if state is not None else WorkerState(torch.device("cpu"))
        self.owner = owner
        self.published_bytes = 0

    def publish(self, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        sent = weight.detach().clone()
        self._emit("publish", layer_id, sent)
        self.state.publish(self.owner, layer_id, sent, op)
        self.published_bytes += payload_bytes(sent)

    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        sent = x.detach().clone()
        self._emit("run", layer_id, sent)
        future: Future[torch.Tensor] = Future()
        started = self.timings.start()
        try:
            y, worker_s = self.state.run(self.owner, layer_id, sent)
        except Exception as exc:  # delivered through the future, as a remote failure would be
            future.set_exception(exc)
            return future
        self.timings.record(started, worker_s, payload_bytes(sent), payload_bytes(y))
        future.set_result(y)
        return future

    def close(self) -> None:
        self.state.release(self.owner)

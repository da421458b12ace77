"""`RpcTransport`: the master's side of the wire over `torch.distributed.rpc` (TensorPipe).

Every rank is a process named `worker{RANK}` (as the seed's harness named them). A master sends
each layer's published weight once (`publish`) into its own store on the worker; per call only the
activation travels, and the worker answers with the result and its own compute time. Every call
carries an explicit timeout, and a worker that is gone surfaces as `WorkerUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed.rpc as rpc

from groupcover import errors, worker
from groupcover.errors import (
    GroupCoverError,
    WorkerError,
    WorkerUnavailable,
    print_error,
)
from groupcover.rendezvous import DEFAULT_TIMEOUT_S, PEER_GONE, PEER_HINT, Rendezvous, rank_name
from groupcover.transport import LayerOp, Transport, payload_bytes


def backend_options(rendezvous: Rendezvous) -> rpc.TensorPipeRpcBackendOptions:
    return rpc.TensorPipeRpcBackendOptions(
        init_method=rendezvous.url,
        rpc_timeout=rendezvous.timeout_s,
        _transports=["uv"] if rendezvous.force_tcp else None,
        _channels=["basic"] if rendezvous.force_tcp else None,
    )


def join(rendezvous: Rendezvous, role: str) -> None:
    """Initialise RPC for this process; returns once every rank of the world has joined.

    torch's rendezvous waits for missing ranks far longer than any RPC timeout, so a deadline
    guards it: when the world is not complete within the timeout, the process reports it and
    exits with `WorkerUnavailable`'s code instead of hanging.
    """
    if rendezvous.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = rendezvous.ifname
        os.environ["TP_SOCKET_IFNAME"] = rendezvous.ifname
    worker.set_role(role)
    warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
    missing = WorkerUnavailable(
        f"the RPC world at {rendezvous.url} did not assemble within {rendezvous.timeout_s:g} s "
        f"(rank {rendezvous.rank} of {rendezvous.world_size})",
        hint=f"start all {rendezvous.world_size} ranks within --timeout of each other, and "
        "check that every rank reaches the rendezvous address and port",
    )
    with _deadline(rendezvous.timeout_s, missing):
        try:
            rpc.init_rpc(
                rank_name(rendezvous.rank),
                rank=rendezvous.rank,
                world_size=rendezvous.world_size,
                rpc_backend_options=backend_options(rendezvous),
            )
        except (RuntimeError, ValueError) as exc:
            raise WorkerUnavailable(
                f"could not join the RPC world at {rendezvous.url} as rank {rendezvous.rank}: "
                f"{_first_line(exc)}",
                hint=missing.hint,
            ) from None


@contextlib.contextmanager
def _deadline(seconds: float, error: GroupCoverError) -> Iterator[None]:
    """Ends the process with `error` if the block is still running after `seconds`."""
    finished = threading.Event()

    def expire() -> None:
        if not finished.is_set():
            print_error(error)
            os._exit(error.exit_code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        finished.set()
        timer.cancel()


def leave(graceful: bool = True) -> None:
    """Graceful: wait until every rank has finished (a worker serves until then)."""
    rpc.shutdown(graceful=graceful)


def finish(rendezvous: Rendezvous) -> None:
    """The graceful end of a rank: wait until every rank has finished, then leave.

    torch's shutdown barrier waits without a time limit, so a rank that died would leave the
    others waiting forever. While waiting, this rank asks every other rank for a sign of life;
    when one stops answering and the barrier does not complete within the timeout either, it
    gives up with `WorkerUnavailable`.
    """
    errors_seen: list[BaseException] = []
    # torch logs a dead peer's failed barrier with a traceback of its own; this rank reports it
    # in one line (WorkerUnavailable below), so that record is dropped
    torch_log = logging.getLogger("torch.distributed.rpc.api")

    def quiet(record: logging.LogRecord) -> bool:
        return False

    def barrier() -> None:
        torch_log.addFilter(quiet)
        try:
            leave(graceful=True)
        except Exception as exc:  # reported by the calling thread
            errors_seen.append(exc)
        finally:
            torch_log.removeFilter(quiet)

    waiter = threading.Thread(target=barrier, name="groupcover-shutdown", daemon=True)
    waiter.start()
    peers = [rank for rank in range(rendezvous.world_size) if rank != rendezvous.rank]
    interval = min(5.0, rendezvous.timeout_s / 2)
    while waiter.is_alive():
        waiter.join(interval)
        if waiter.is_alive() and not _peers_alive(peers, rendezvous.timeout_s):
            waiter.join(rendezvous.timeout_s)
            if waiter.is_alive():
                raise WorkerUnavailable(f"{PEER_GONE} (it stopped answering)", hint=PEER_HINT)
    if errors_seen:
        detail = _first_line(errors_seen[0])
        raise WorkerUnavailable(f"{PEER_GONE} (shutdown: {detail})", hint=PEER_HINT)


def _peers_alive(peers: list[int], timeout_s: float) -> bool:
    try:
        for rank in peers:
            rpc.rpc_sync(rank_name(rank), worker.remote_hello, timeout=timeout_s)
    except Exception:
        return False
    return True


def serve(rendezvous: Rendezvous) -> None:
    """A worker's whole life: join, serve RPCs, leave when every master has finished."""
    join(rendezvous, "worker")
    finish(rendezvous)


def hello(rank: int, timeout_s: float) -> dict[str, str]:
    """Asks a rank for its role; the master uses it to refuse a target that is not a worker."""
    try:
        return rpc.rpc_sync(rank_name(rank), worker.remote_hello, timeout=timeout_s)
    except (RuntimeError, ValueError) as exc:
        raise _translate(exc, rank, "hello") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_REMOTE_ERROR = re.compile(r"^groupcover\.errors\.(\w+): (.*)$", re.MULTILINE)


def _translate(exc: BaseException, rank: int, what: str) -> GroupCoverError:
    """A GroupCoverError raised on the worker comes back as its own class; a failure to reach the
    worker becomes WorkerUnavailable; any other remote failure, WorkerError."""
    if isinstance(exc, GroupCoverError):
        return exc
    text = str(exc)
    remote = _REMOTE_ERROR.findall(text)
    if remote:
        name, message = remote[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, GroupCoverError):
            return cls(message)
    if "On WorkerInfo" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return WorkerError(f"{rank_name(rank)} failed in {what}: {lines[-1] if lines else text}")
    message = _first_line(exc)
    return WorkerUnavailable(
        f"{rank_name(rank)} did not answer {what}: {message}",
        hint="is the worker process running and reachable? (it may have died or timed out)",
    )


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its data: RPC sends a view's whole storage, so a slice of a
    larger buffer is copied first; a dense tensor in any layout (e.g. features-first) is not."""
    tensor = tensor.detach()
    if tensor.untyped_storage().nbytes() == payload_bytes(tensor) and tensor.storage_offset() == 0:
        return tensor
    return tensor.contiguous().clone()


class RpcTransport(Transport):
    """One master session's layers on one worker. Needs `join` first; many may share a world."""

    def __init__(self, worker_rank: int, owner: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__()
        self.worker_rank = worker_rank
        self.to = rank_name(worker_rank)
        self.owner = owner
        self.timeout_s = timeout_s
        self.published_bytes = 0

    def _sync(self, func: Callable[..., Any], args: tuple[Any, ...], what: str) -> Any:
        try:
            return rpc.rpc_sync(self.to, func, args=args, timeout=self.timeout_s)
        except Exception as exc:
            raise _translate(exc, self.worker_rank, what) from None

    def publish(self, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        sent = _wire(weight)
        self._emit("publish", layer_id, sent)
        self._sync(worker.remote_publish, (self.owner, layer_id, sent, op), f"publish {layer_id}")
        self.published_bytes += payload_bytes(sent)

    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        sent = _wire(x)
        self._emit("run", layer_id, sent)
        result: Future[torch.Tensor] = Future()
        start = self.timings.start()
        try:
            pending = rpc.rpc_async(
                self.to,
                worker.remote_run,
                args=(self.owner, layer_id, sent),
                timeout=self.timeout_s,
            )
        except Exception as exc:
            result.set_exception(_translate(exc, self.worker_rank, f"run {layer_id}"))
            return result

        def arrived(done: torch.futures.Future[tuple[torch.Tensor, float]]) -> None:
            try:
                y, worker_s = done.value()
            except Exception as exc:
                result.set_exception(_translate(exc, self.worker_rank, f"run {layer_id}"))
                return
            self.timings.record(start, worker_s, payload_bytes(sent), payload_bytes(y))
            result.set_result(y)

        pending.add_done_callback(arrived)
        return result

    def layers_on_worker(self) -> dict[str, int]:
        """Layer counts per owner as the worker holds them (for tests and diagnostics)."""
        return self._sync(worker.remote_owners, (), "owners")

    def close(self) -> None:
        self._sync(worker.remote_release, (self.owner,), "release")

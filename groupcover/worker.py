"""The worker's side: a store of published layers per master, and the bias-free computation.

The worker never sees a module or the model, only the published (obfuscated) weight tensors and a
`LayerOp` saying which operation to apply. Weights are kept on CUDA when the worker has it, else on
the CPU. Each master's layers live under their own key, so several masters can share one worker.
The RPC entry points at the bottom are module-level functions, so `torch.distributed.rpc` sends
them by reference (qualified name), never by value.
"""

from __future__ import annotations

import resource
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from groupcover.errors import GroupCoverError, UnknownLayer
from groupcover.layer_op import LayerOp, PublishedRef, apply_op
from groupcover.published import DigestMismatch, PublishedError, PublishedFile


def exact_math() -> None:
    """No TF32 on CUDA: GroupCover's integer mixing amplifies rounding, and TF32's 10-bit
    mantissa would break the exactness bound the CPU path holds. Called when a worker starts."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def peak_rss_bytes() -> int:
    """This process's peak resident set (getrusage: KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class NoPackage(GroupCoverError):
    """A publish by reference names a package this worker holds no copy of."""


class PublishedMismatch(GroupCoverError):
    """The worker's copy of a published tensor does not have the digest the master names."""


@dataclass(frozen=True)
class PublishedLayer:
    weight: torch.Tensor
    op: LayerOp


class WorkerState:
    """Published layers keyed by (owner, layer id); owner names one master's session."""

    def __init__(self, device: torch.device | None = None) -> None:
        exact_math()
        self.device = device if device is not None else default_device()
        self._layers: dict[tuple[str, str], PublishedLayer] = {}
        self._lock = threading.Lock()
        self.packages: dict[str, PublishedFile] = {}  # package id -> its published weights
        # tensors loaded from a package, shared by every session that publishes them by
        # reference (read-only): one copy per (package, tensor, digest, dtype) while in use
        self._shared: weakref.WeakValueDictionary[
            tuple[str, int, str, torch.dtype], torch.Tensor
        ] = weakref.WeakValueDictionary()
        self._load_lock = threading.Lock()

    def add_published(self, published: PublishedFile) -> None:
        """A package's published weights this worker may load layers from."""
        if not published.package_id:
            raise GroupCoverError(
                f"{published.path} names no package id",
                hint="use the published.safetensors that `protect` wrote",
            )
        self.packages[published.package_id] = published

    def publish_ref(
        self, owner: str, layer_id: str, ref: PublishedRef, dtype: torch.dtype, op: LayerOp
    ) -> int:
        """Loads a layer from this worker's own copy of its package (checked against the
        digest the master names); returns its bytes. `NoPackage` / `PublishedMismatch`."""
        published = self.packages.get(ref.package_id)
        if published is None:
            raise NoPackage(f"no copy of package {ref.package_id} on this worker")
        key = (ref.package_id, ref.index, ref.sha256, dtype)
        with self._load_lock:
            stored = self._shared.get(key)
            if stored is None:
                name = str(ref.index)
                entry = published.entries.get(name)
                if entry is None or entry.shape != ref.shape:
                    raise PublishedMismatch(
                        f"package {ref.package_id[:8]} has no tensor {name} of shape "
                        f"{ref.shape} in {published.path.name}"
                    )
                try:
                    tensor = published.read(name, digest=ref.sha256)
                except DigestMismatch as exc:
                    raise PublishedMismatch(exc.message) from None
                except PublishedError as exc:
                    raise PublishedMismatch(exc.message) from None
                stored = tensor.to(self.device, dtype).contiguous()
                self._shared[key] = stored
        with self._lock:
            self._layers[(owner, layer_id)] = PublishedLayer(stored, op)
        return stored.numel() * stored.element_size()

    def publish(self, owner: str, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        stored = weight.detach().to(self.device, copy=True).contiguous()
        with self._lock:
            self._layers[(owner, layer_id)] = PublishedLayer(stored, op)

    def run(self, owner: str, layer_id: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The result on the CPU, and the worker's seconds for it (device copies included)."""
        layer = self._layers.get((owner, layer_id))
        if layer is None:
            raise UnknownLayer(f"the worker holds no layer {layer_id!r} for {owner}")
        start = time.perf_counter()
        with torch.no_grad():
            # computed in the published weight's dtype (float64 in masked modes)
            y = apply_op(layer.op, x.to(self.device, layer.weight.dtype), layer.weight)
            if y.device.type == "cuda":
                torch.cuda.synchronize(y.device)
            y = y.to("cpu")  # a fresh result already: no copy on a CPU worker
        return y, time.perf_counter() - start

    def release(self, owner: str) -> int:
        """Drops every layer of one owner; returns how many there were."""
        with self._lock:
            keys = [key for key in self._layers if key[0] == owner]
            for key in keys:
                del self._layers[key]
        return len(keys)

    def owners(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for owner, _ in self._layers:
                counts[owner] = counts.get(owner, 0) + 1
            return counts


# ---- RPC entry points (run in the worker process) ------------------------------------------

_STATE: WorkerState | None = None
_ROLE = "master"


def set_role(role: str) -> None:
    """Each process records its role before joining RPC, so a master can check its target."""
    global _ROLE
    _ROLE = role


def _state() -> WorkerState:
    global _STATE
    if _STATE is None:
        _STATE = WorkerState()
    return _STATE


def remote_hello() -> dict[str, str]:
    return {"role": _ROLE, "device": str(_state().device) if _ROLE == "worker" else "none"}


def remote_publish(owner: str, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
    _state().publish(owner, layer_id, weight, op)


def remote_run(owner: str, layer_id: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    return _state().run(owner, layer_id, x)


def remote_release(owner: str) -> int:
    return _state().release(owner)


def remote_owners() -> dict[str, int]:
    return _state().owners()

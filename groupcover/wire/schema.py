"""The master <-> worker message schema: a fixed binary header, then raw little-endian bytes.

Every message is one 96-byte header, for `PUBLISH` a fixed 36-byte op block, then exactly
`nbytes` of payload. Nothing is ever unpickled, evaluated or looked up by name: a peer can only
send numbers that are checked against fixed ranges, and tensor bytes that land in a buffer whose
size the receiver chose before reading them.

    header  <4s H H Q I B B H 6Q 6B 2x Q d>  (little endian, 96 bytes)
            magic "GCVW", version, op, request id, layer id, dtype code, ndim, flags (error
            code in ERROR replies), shape[6] (unused dims 0), order[6] (memory order of the dims,
            outermost first; a dense tensor in any layout, e.g. features-first), payload bytes,
            value (the worker's compute seconds in RESULT, a count in OK)
    op      <B B B B 2I 2I 2I I 4x>  (PUBLISH only, 36 bytes)
            kind (1 linear, 2 conv1d, 3 conv2d), spatial dims, transposed flag, quantum (0: a
            float op; else 128 + c: int32 residues in, round(y / 2^c) mod 2^32 out as int32),
            stride[2], padding[2], dilation[2], groups

    ref     <16s I B B B x 6Q 32s>  (PUBLISH_REF only, after the op block: 104 bytes)
            package id, tensor index, file dtype code, compute dtype code, ndim, shape[6],
            SHA-256 of the tensor as stored in the package's published.safetensors

Requests: HELLO (payload: the master's name, ASCII), PUBLISH (op block + weight), PUBLISH_REF
(a byte payload: op block + ref block; the worker loads the tensor from its own copy of the
package and refuses a digest that does not match), RUN (the input), RELEASE, STATS, MEMORY (OK
carries the worker's peak resident set in bytes). Replies: WELCOME (payload: the worker's
device, ASCII), OK, RESULT (the output), ERROR (code in flags, payload: a short ASCII message).
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from enum import IntEnum

import torch

from groupcover.layer_op import LayerOp, OpKind, PublishedRef

MAGIC = b"GCVW"
VERSION = 1
MAX_NDIM = 6
MAX_TEXT = 512  # bytes of an ASCII payload (names, devices, error messages)
HEADER = struct.Struct("<4sHHQIBBH6Q6B2xQd")
OP_BLOCK = struct.Struct("<BBBB2I2I2II4x")
REF_BLOCK = struct.Struct("<16sIBBBx6Q32s")
REF_PAYLOAD = OP_BLOCK.size + REF_BLOCK.size
MAX_DIM = 1 << 40  # no dimension is larger; keeps products far from overflow

if sys.byteorder != "little":  # pragma: no cover - every supported host is little endian
    raise ImportError("groupcover.wire sends raw little-endian bytes: big-endian hosts unsupported")


class Op(IntEnum):
    HELLO = 1
    PUBLISH = 2
    RUN = 3
    RELEASE = 4
    STATS = 5
    PUBLISH_REF = 6
    MEMORY = 7
    WELCOME = 0x81
    OK = 0x82
    RESULT = 0x83
    ERROR = 0x8F


REQUESTS = frozenset({Op.HELLO, Op.PUBLISH, Op.RUN, Op.RELEASE, Op.STATS, Op.PUBLISH_REF,
                      Op.MEMORY})  # fmt: skip


class ErrorCode(IntEnum):
    UNKNOWN_LAYER = 1
    BAD_REQUEST = 2
    TOO_LARGE = 3
    COMPUTE_FAILED = 4
    NO_PACKAGE = 5  # PUBLISH_REF: the worker holds no copy of that package
    DIGEST_MISMATCH = 6  # PUBLISH_REF: its copy's tensor is not the one the master names


BYTES = 0  # dtype code of an ASCII payload
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float64,
    3: torch.float16,
    4: torch.bfloat16,
    5: torch.int32,  # residues mod 2^32: the payloads and results of masked calls
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
KINDS: dict[int, OpKind] = {1: "linear", 2: "conv1d", 3: "conv2d"}
KIND_CODES = {kind: code for code, kind in KINDS.items()}
SPATIAL = {"linear": 1, "conv1d": 1, "conv2d": 2}
MAX_OP_VALUE = 1 << 16  # strides, paddings, dilations, groups
QUANTUM_BIAS = 128  # the op block's quantum byte: 128 + c for a result quantum 2^c


class SchemaError(ValueError):
    """A message that does not follow the schema (the text says which field and why)."""


@dataclass(frozen=True)
class Header:
    op: Op
    request: int
    layer: int = 0
    dtype: int = BYTES
    shape: tuple[int, ...] = ()
    order: tuple[int, ...] = ()
    nbytes: int = 0
    flags: int = 0
    value: float = 0.0
    version: int = VERSION
    magic: bytes = MAGIC

    def pack(self) -> bytes:
        ndim = len(self.shape)
        pad = MAX_NDIM - ndim
        return HEADER.pack(
            self.magic, self.version, self.op, self.request, self.layer, self.dtype, ndim,
            self.flags, *self.shape, *([0] * pad), *self.order, *([0] * pad), self.nbytes,
            self.value,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Decodes and checks everything a header can say on its own (not what was expected)."""
        fields = HEADER.unpack(data)
        magic, version, op, request, layer, dtype, ndim, flags = fields[:8]
        shape_all, order_all = fields[8:14], fields[14:20]
        nbytes, value = fields[20], fields[21]
        if magic != MAGIC:
            raise SchemaError(f"bad magic {bytes(magic)!r}")
        if version != VERSION:
            raise SchemaError(f"protocol version {version}, expected {VERSION}")
        if op not in Op._value2member_map_:
            raise SchemaError(f"unknown op {op}")
        if ndim > MAX_NDIM:
            raise SchemaError(f"{ndim} dimensions (at most {MAX_NDIM})")
        if any(shape_all[ndim:]) or any(order_all[ndim:]):
            raise SchemaError("non-zero unused dimension fields")
        shape, order = tuple(shape_all[:ndim]), tuple(order_all[:ndim])
        if any(d > MAX_DIM for d in shape):
            raise SchemaError(f"dimension out of range in shape {shape}")
        if sorted(order) != list(range(ndim)):
            raise SchemaError(f"dimension order {order} is not a permutation of {ndim} dims")
        if dtype != BYTES and dtype not in DTYPES:
            raise SchemaError(f"unknown dtype code {dtype}")
        if dtype == BYTES and ndim > 1:
            raise SchemaError("a byte payload has at most one dimension")
        expected = tensor_nbytes(dtype, shape) if ndim or dtype != BYTES else 0
        if nbytes != expected:
            raise SchemaError(f"payload of {nbytes} bytes for dtype {dtype} shape {shape}")
        if not math.isfinite(value) or value < 0:
            raise SchemaError(f"value {value} is not a finite non-negative number")
        return cls(Op(op), request, layer, dtype, shape, order, nbytes, flags, value)


def itemsize(dtype_code: int) -> int:
    return 1 if dtype_code == BYTES else DTYPES[dtype_code].itemsize


def result_dtype(op: LayerOp, weight_code: int) -> int:
    """The dtype code of a layer's results: its weight's, or int32 residues for a quantized
    op (a masked layer)."""
    return DTYPE_CODES[torch.int32] if "quantum" in op.params else weight_code


def tensor_nbytes(dtype_code: int, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * itemsize(dtype_code)


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise SchemaError(
            f"the wire carries float32/64/16, bfloat16 and int32, not {dtype}"
        ) from None


# ---- tensors as raw bytes --------------------------------------------------------------------


def memory_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The dims outermost first if `tensor` is dense in some order (no gaps, no overlap)."""
    if tensor.dim() == 0:
        return ()
    strides, sizes = tensor.stride(), tuple(tensor.shape)
    order = tuple(sorted(range(tensor.dim()), key=lambda d: (-strides[d], -sizes[d])))
    if tensor.permute(order).is_contiguous():
        return order
    return None


def as_wire(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A CPU tensor whose memory is exactly its data, and its dims' memory order.

    A dense tensor in any layout (features-first, channels-last) is sent as it is; a view into a
    larger buffer, or with gaps, is copied first.
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    order = memory_order(tensor)
    if order is None:
        tensor = tensor.contiguous()
        order = tuple(range(tensor.dim()))
    return tensor, order


def byte_view(tensor: torch.Tensor, order: tuple[int, ...]) -> memoryview:
    """The tensor's bytes, in memory order, without a copy (the tensor must outlive the view)."""
    flat = tensor.permute(order) if order else tensor.reshape(1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def empty_for(dtype_code_: int, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """A fresh tensor of `shape` laid out in `order`, to be filled with `byte_view`."""
    dtype = DTYPES[dtype_code_]
    stored = torch.empty([shape[d] for d in order], dtype=dtype)
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return stored.permute(inverse) if order else stored


def text_view(text: str) -> bytes:
    data = text.encode("ascii", "replace")[:MAX_TEXT]
    return data


def decode_text(data: bytes) -> str:
    """Printable ASCII only: a peer's text never reaches a terminal as control characters."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in data.decode("ascii", "replace"))


# ---- the op block ----------------------------------------------------------------------------


def pack_op(op: LayerOp) -> bytes:
    if op.kind not in KIND_CODES:
        raise SchemaError(f"unknown layer op kind {op.kind!r}")
    n = SPATIAL[op.kind]
    values = tuple(tuple(v) * n if len(v) == 1 else tuple(v) for v in (op.stride, op.padding,
                                                                       op.dilation))  # fmt: skip
    if any(len(v) != n for v in values):
        raise SchemaError(f"{op.kind} takes {n} stride/padding/dilation values, got {values}")
    stride, padding, dilation = values
    unknown = set(op.params) - {"groups", "transposed", "quantum"}
    if unknown:
        raise SchemaError(f"layer op parameter(s) {sorted(unknown)} have no wire encoding")
    groups = op.params.get("groups", 1)
    transposed = op.params.get("transposed", 0)
    if transposed not in (0, 1) or (op.kind != "linear" and transposed):
        raise SchemaError(f"transposed={transposed} for a {op.kind} op")
    for v in (*stride, *padding, *dilation, groups):
        if not isinstance(v, int) or not 0 <= v <= MAX_OP_VALUE:
            raise SchemaError(f"layer op value {v!r} out of range")
    quantum = op.params.get("quantum")
    if quantum is not None and (not isinstance(quantum, int) or not -QUANTUM_BIAS < quantum
                                < QUANTUM_BIAS):  # fmt: skip
        raise SchemaError(f"result quantum exponent {quantum!r} out of range")
    quantum_code = 0 if quantum is None else QUANTUM_BIAS + quantum
    pad = [0] * (2 - n)
    return OP_BLOCK.pack(
        KIND_CODES[op.kind], n, transposed, quantum_code, *stride, *pad, *padding, *pad,
        *dilation, *pad, groups,
    )  # fmt: skip


def unpack_op(data: bytes | bytearray | memoryview) -> LayerOp:
    kind_code, n, transposed, quantum_code, *rest = OP_BLOCK.unpack(data)
    if kind_code not in KINDS:
        raise SchemaError(f"unknown layer op kind code {kind_code}")
    kind = KINDS[kind_code]
    if n != SPATIAL[kind] or transposed not in (0, 1):
        raise SchemaError("malformed layer op block")
    if transposed and kind != "linear":
        raise SchemaError("only a linear op can be transposed")
    stride, padding, dilation = rest[0:2], rest[2:4], rest[4:6]
    groups = rest[6]
    if any(v != 0 for v in (*stride[n:], *padding[n:], *dilation[n:])):
        raise SchemaError("non-zero unused layer op fields")
    if any(v < 1 for v in (*stride[:n], *dilation[:n], groups)):
        raise SchemaError("stride, dilation and groups must be positive")
    if any(v > MAX_OP_VALUE for v in rest):
        raise SchemaError("layer op value out of range")
    params: dict[str, int] = {}
    if groups != 1:
        params["groups"] = groups
    if transposed:
        params["transposed"] = 1
    if quantum_code:
        params["quantum"] = quantum_code - QUANTUM_BIAS
    return LayerOp(kind, tuple(stride[:n]), tuple(padding[:n]), tuple(dilation[:n]), params)


# ---- what the master expects back --------------------------------------------------------------


def output_shape(
    op: LayerOp, x_shape: tuple[int, ...], w_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The shape op(x, w) has; `SchemaError` when the input does not fit the weight."""
    groups = op.params.get("groups", 1)
    if op.kind == "linear":
        if len(w_shape) != 2 or not x_shape or x_shape[-1] != w_shape[1]:
            raise SchemaError(f"input {x_shape} does not fit a linear weight {w_shape}")
        return (*x_shape[:-1], w_shape[0])
    n = SPATIAL[op.kind]
    if len(x_shape) != n + 2 or len(w_shape) != n + 2 or x_shape[1] != w_shape[1] * groups:
        raise SchemaError(f"input {x_shape} does not fit a {op.kind} weight {w_shape}")
    stride, padding, dilation = (tuple(v) * n if len(v) == 1 else tuple(v)
                                 for v in (op.stride, op.padding, op.dilation))  # fmt: skip
    spatial = []
    for i in range(n):
        size = x_shape[2 + i] + 2 * padding[i] - dilation[i] * (w_shape[2 + i] - 1) - 1
        if size < 0:
            raise SchemaError(f"input {x_shape} is too small for a {op.kind} weight {w_shape}")
        spatial.append(size // stride[i] + 1)
    return (x_shape[0], w_shape[0], *spatial)


@dataclass(frozen=True)
class RunCost:
    """What one RUN asks of the worker, known from shapes alone before anything is allocated."""

    nbytes: int  # an upper bound of the bytes the computation allocates
    macs: int  # multiply-accumulates


def run_cost(op: LayerOp, x_shape: tuple[int, ...], w_shape: tuple[int, ...], item: int) -> RunCost:
    """The bytes and multiply-accumulates of op(x, w) computed in a dtype of `item` bytes.

    The bytes bound everything `apply_op` may allocate: the input converted to the weight's dtype
    (or made contiguous), the output (and, for a quantized op, its residues' copies) and, for a
    convolution, the unfolded (im2col) input torch's CPU convolution builds, N * C_in *
    prod(kernel) * prod(output spatial) elements (padding included), which for a large kernel
    is far larger than the input or the output. The MACs are the op's arithmetic; no torch op
    can be interrupted, so they are what bounds a RUN's time.
    `SchemaError` when the input does not fit the weight.
    """
    out_shape = output_shape(op, x_shape, w_shape)
    x_numel, out_numel = math.prod(x_shape), math.prod(out_shape)
    # a quantized op turns its output into residues: a scaled copy, int64 and int32 ones
    outputs = out_numel * (item + 8 + 8 + 4) if "quantum" in op.params else out_numel * item
    if op.kind == "linear":
        return RunCost(x_numel * item + outputs, out_numel * w_shape[1])
    kernel = math.prod(w_shape[2:])
    unfold = x_shape[0] * x_shape[1] * kernel * math.prod(out_shape[2:])
    macs = out_numel * w_shape[1] * kernel  # w_shape[1]: input channels per group
    return RunCost((x_numel + unfold) * item + outputs, macs)


def output_order(op: LayerOp, ndim: int) -> tuple[int, ...]:
    """The memory order of the worker's result: features-first for a transposed linear op."""
    if op.kind == "linear" and op.params.get("transposed", 0) and ndim >= 1:
        return (ndim - 1, *range(ndim - 1))
    return tuple(range(ndim))


# ---- publish by reference --------------------------------------------------------------------


def pack_ref(ref: PublishedRef, compute_dtype: int) -> bytes:
    try:
        package = bytes.fromhex(ref.package_id)
        digest = bytes.fromhex(ref.sha256)
    except ValueError:
        raise SchemaError("a package id and a digest are hex strings") from None
    if len(package) != 16 or len(digest) != 32:
        raise SchemaError("a package id is 16 bytes and a digest 32")
    ndim = len(ref.shape)
    if ndim > MAX_NDIM or not 0 <= ref.index < 1 << 32:
        raise SchemaError(f"cannot reference tensor {ref.index} of shape {ref.shape}")
    file_code = dtype_code(getattr(torch, ref.file_dtype))
    return REF_BLOCK.pack(package, ref.index, file_code, compute_dtype, ndim,
                          *ref.shape, *([0] * (MAX_NDIM - ndim)), digest)  # fmt: skip


def unpack_ref(data: bytes | bytearray | memoryview) -> tuple[PublishedRef, int]:
    """(the reference, the compute dtype code); `SchemaError` for anything malformed."""
    package, index, file_code, compute, ndim, *rest = REF_BLOCK.unpack(data)
    shape_all, digest = rest[:MAX_NDIM], rest[MAX_NDIM]
    if file_code not in DTYPES or compute not in DTYPES:
        raise SchemaError("unknown dtype code in a published reference")
    if not 1 <= ndim <= MAX_NDIM or any(shape_all[ndim:]):
        raise SchemaError(f"a published reference with {ndim} dimensions")
    shape = tuple(shape_all[:ndim])
    if any(not 0 < d <= MAX_DIM for d in shape):
        raise SchemaError(f"dimension out of range in shape {shape}")
    file_dtype = str(DTYPES[file_code]).removeprefix("torch.")
    return PublishedRef(package.hex(), index, digest.hex(), shape, file_dtype), compute

"""The plaintext inside a sealed bundle: one safetensors blob whose metadata holds the bundle's
JSON (`gcvm`), read back as views into the decrypted buffer (no second copy of any tensor)."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from groupcover.package.seal import SealError

_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    from safetensors.torch import save  # only the writer (protect) needs it, not the master

    ready = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return save(ready, metadata={"gcvm": json.dumps(meta, sort_keys=True)})


def unpack(buffer: bytearray) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors); every tensor is a view into `buffer` (which it keeps alive)."""
    try:
        (length,) = struct.unpack_from("<Q", buffer, 0)
        header = json.loads(bytes(buffer[8 : 8 + length]))
        meta = json.loads(header.pop("__metadata__")["gcvm"])
    except (struct.error, ValueError, KeyError, TypeError):
        raise SealError("the sealed bundle's content is not a gcvm bundle") from None
    base = 8 + length
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = _DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        start, end = (int(v) for v in info["data_offsets"])
        count = end - start
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=base + start)
        tensors[name] = flat.view(dtype).view(shape)
    return meta, tensors

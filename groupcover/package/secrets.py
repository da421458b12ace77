"""A layer's secrets (any `LayerSecret` of a scheme) as JSON fields plus named tensors, and back.

Only the classes listed in `SECRET_CLASSES` are rebuilt (the bundle is authenticated, but nothing
in it is ever a class name looked up freely); field values are tensors, None, numbers, strings,
torch dtypes, tuples of tensors, `Butterfly` transforms and string-keyed dicts of these.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from groupcover.schemes.base import LayerSecret
from groupcover.schemes.baselines import RowSecret, SplitSecret
from groupcover.schemes.hardened import Butterfly, HardenedSecret

SECRET_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (LayerSecret, HardenedSecret, RowSecret, SplitSecret, Butterfly)
}
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64,
                                                       torch.float16, torch.bfloat16)}  # fmt: skip


def encode(secret: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """JSON for `secret`; its tensors are added to `tensors` under `prefix/...`."""
    return _encode(secret, prefix, tensors)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {"tensor": path}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple | list):
        return {"tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and type(value).__name__ in SECRET_CLASSES:
        skip = {"blocks32"} if isinstance(value, Butterfly) else set()  # derived: rebuilt
        fields = {f.name: _encode(getattr(value, f.name), f"{path}.{f.name}", tensors)
                  for f in dataclasses.fields(value) if f.name not in skip}  # fmt: skip
        return {"class": type(value).__name__, "fields": fields}
    raise TypeError(f"cannot seal a secret field of type {type(value).__name__}")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise ValueError("malformed sealed secret")
    if "tensor" in data:
        return tensors[data["tensor"]]
    if "dtype" in data:
        return _DTYPES[data["dtype"]]
    if "tuple" in data:
        return tuple(decode(v, tensors) for v in data["tuple"])
    if "dict" in data:
        return {k: decode(v, tensors) for k, v in data["dict"].items()}
    cls = SECRET_CLASSES[data["class"]]
    fields = {k: decode(v, tensors) for k, v in data["fields"].items()}
    if cls is Butterfly:
        fields["blocks32"] = tuple(b.to(torch.float32) for b in fields["blocks"])
    return cls(**fields)

"""Where every secret comes from: a DRBG, AES-256 in counter mode, keyed from the OS's CSPRNG.

`SecretRandom.from_os()` (the default everywhere) takes its 256-bit key from `os.urandom(32)`;
`SecretRandom.from_seed(N)` derives it as SHA-256("gcvm-seed" || decimal N), for reproducible
benchmarks only: anyone who knows N regenerates every secret, so such a generator says
"secrets reproducible from seed N: not secret" (`notice`). The keystream is AES-256-CTR (the
`cryptography` package, OpenSSL underneath) from a zero counter block under that key; a
generator is only as secret as its key, and no output of AES-CTR reveals the key (that would be
a distinguisher against AES). The Mersenne Twister behind `torch.Generator` and `numpy` is the
opposite: 624 consecutive 32-bit outputs give its whole state, hence every later draw.

Draws: `integers` is unbiased (rejection of the last partial block of 2^64), `randperm` is a
uniform permutation (ranks of independent 64-bit keys, redrawn on a tie), `uniform` has a full
mantissa (53 random bits for float64, 24 for float32), `normal` is Box-Muller on those uniforms,
`signs` one bit each. `spawn(label)` gives an independent child keyed by HMAC-SHA256(key, label),
so the secrets of, say, one layer do not depend on how much another one drew; use each label
once per parent. A generator cannot be copied or pickled: a copy would replay its stream, and a
replayed one-time mask is no mask.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
_SEED_DOMAIN = b"gcvm-seed"
_SPAWN_DOMAIN = b"gcvm-spawn\x00"
_TWO64 = 1 << 64

Shape = int | Sequence[int] | torch.Size


def seed_notice(seed: int) -> str:
    """What the console and the JSON say when secrets come from a seed."""
    return f"secrets reproducible from seed {seed}: not secret"


OS_NOTICE = "secrets from the OS CSPRNG (AES-256-CTR keyed by os.urandom)"


_ZEROS = memoryview(b"")


def _zeros(n: int) -> memoryview:
    """A read-only view of n zero bytes, from one buffer that only grows."""
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = memoryview(bytes(max(n, 2 * len(_ZEROS))))
    return _ZEROS[:n]


def _shape(shape: Shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(n) for n in shape)


class SecretRandom:
    """A DRBG: AES-256-CTR keyed from os.urandom(32), or from a seed (reproducible)."""

    reproducible: bool  # True when built from a seed
    seed: int | None

    def __init__(self, key: bytes, *, seed: int | None = None, label: str = "") -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a SecretRandom key has {KEY_BYTES} bytes, not {len(key)}")
        self._key = bytes(key)
        self.seed = seed
        self.reproducible = seed is not None
        self.label = label
        cipher = Cipher(algorithms.AES(self._key), modes.CTR(bytes(16)))
        self._stream = cipher.encryptor()
        self._lock = threading.Lock()
        self.bytes_drawn = 0

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_os(cls) -> SecretRandom:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: int) -> SecretRandom:
        """key = SHA-256("gcvm-seed" || decimal seed): reproducible, hence not secret."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"a seed is an int, not {type(seed).__name__}")
        key = hashlib.sha256(_SEED_DOMAIN + str(seed).encode()).digest()
        return cls(key, seed=seed)

    @classmethod
    def create(cls, seed: int | None) -> SecretRandom:
        """None -> from_os(); an int -> from_seed(seed)."""
        return cls.from_os() if seed is None else cls.from_seed(seed)

    def spawn(self, label: str) -> SecretRandom:
        """An independent child stream keyed by HMAC-SHA256(key, label); same label, same child."""
        key = hmac.new(self._key, _SPAWN_DOMAIN + label.encode(), hashlib.sha256).digest()
        path = f"{self.label}/{label}" if self.label else label
        return SecretRandom(key, seed=self.seed, label=path)

    @property
    def notice(self) -> str:
        return OS_NOTICE if self.seed is None else seed_notice(self.seed)

    def __repr__(self) -> str:  # never the key
        where = "os" if self.seed is None else f"seed={self.seed}"
        label = f", label={self.label!r}" if self.label else ""
        return f"SecretRandom({where}{label})"

    def __copy__(self) -> SecretRandom:
        raise TypeError("a SecretRandom cannot be copied: the copy would replay its secrets")

    def __deepcopy__(self, memo: object) -> SecretRandom:
        raise TypeError("a SecretRandom cannot be copied: the copy would replay its secrets")

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a SecretRandom cannot be pickled: its key must stay in this process")

    # ---- raw material ------------------------------------------------------------------------

    def random_bytes(self, n: int) -> bytes:
        return bytes(self._keystream(n)[:n])

    def _keystream(self, n: int) -> bytearray:
        """n keystream bytes at the start of a fresh buffer (encrypting zeros in place: about
        6 GB/s with AES-NI, where `update` with its own allocation is several times slower)."""
        if n < 0:
            raise ValueError("a byte count is >= 0")
        out = bytearray(n + 15)  # update_into wants room for one block more
        with self._lock:
            self.bytes_drawn += n
            self._stream.update_into(_zeros(n), out)
        return out

    def _words(self, count: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        little = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self._keystream(count * size), dtype=little, count=count)

    def _u64(self, count: int) -> np.ndarray:
        return self._words(count, np.uint64).astype(np.uint64, copy=False)

    # ---- draws -------------------------------------------------------------------------------

    def integers(self, low: int, high: int, shape: Shape) -> torch.Tensor:
        """int64 uniform in [low, high), unbiased: draws past the last whole multiple of the
        range in 2^64 are rejected and redrawn."""
        low, high = int(low), int(high)
        span = high - low
        if span <= 0:
            raise ValueError(f"empty range [{low}, {high})")
        if low < -(1 << 63) or high > (1 << 63):
            raise ValueError("integers draws int64 values")
        dims = _shape(shape)
        count = math.prod(dims)
        if span == 1:
            return torch.full(dims, low, dtype=torch.int64)
        limit = (_TWO64 // span) * span  # accept u < limit: every residue equally often
        accepted = np.empty(0, dtype=np.uint64)
        while accepted.size < count:
            need = count - accepted.size
            draw = self._u64(need + need // 8 + 8)
            if limit < _TWO64:
                draw = draw[draw < np.uint64(limit)]
            accepted = np.concatenate([accepted, draw[:need]])
        residues = accepted if span == _TWO64 else accepted % np.uint64(span)
        # low + residue < 2^63 always; add modulo 2^64 and read the bits back as int64
        values = (residues + np.uint64(low % _TWO64)).view(np.int64)
        return torch.from_numpy(values.reshape(dims))

    def randperm(self, n: int) -> torch.Tensor:
        """A uniform permutation of 0..n-1 (int64): the ranks of n independent 64-bit keys.

        Given distinct keys every order is equally likely (symmetry); a tie is redrawn.
        """
        if n < 0:
            raise ValueError("a permutation length is >= 0")
        while True:
            keys = self._u64(n)
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            if n < 2 or bool((sorted_keys[1:] != sorted_keys[:-1]).all()):
                return torch.from_numpy(order.astype(np.int64))

    def _unit(self, count: int, dtype: torch.dtype) -> np.ndarray:
        """count uniforms in [0, 1) with a full mantissa of `dtype` (float64 or float32)."""
        if dtype == torch.float64:
            return (self._u64(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        if dtype == torch.float32:
            words = self._words(count, np.uint32).astype(np.uint32, copy=False)
            return (words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
        raise ValueError(f"SecretRandom draws float64 or float32, not {dtype}")

    def uniform(
        self,
        shape: Shape,
        low: float = 0.0,
        high: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """Uniform in [low, high) (rounding may reach `high` when the span is not a power of 2)."""
        dims = _shape(shape)
        unit = torch.from_numpy(self._unit(math.prod(dims), dtype)).view(dims)
        if (low, high) == (0.0, 1.0):
            return unit
        return unit.mul_(high - low).add_(low)

    def grid_uniform(self, count: int, radius: float) -> torch.Tensor:
        """count float64 values uniform on the grid of [-radius, radius) with step
        radius x 2^-52: each an arithmetic right shift by 11 of a signed 64-bit keystream word
        (an integer k uniform in [-2^52, 2^52)) times the step. The same law as `uniform(count,
        -radius, radius)` where radius is a power of two (exact there: k x step), in three passes
        over the keystream (one fresh array) instead of five (three); about 20% faster."""
        words = np.frombuffer(self._keystream(count * 8), dtype=np.dtype("<i8"), count=count)
        np.right_shift(words, 11, out=words)  # in place on this call's own keystream buffer
        # (a numpy conversion then an in-place scaling: writing the product straight into a
        # fresh torch buffer, or converting in torch, was 4x slower on one thread)
        return torch.from_numpy(words.astype(np.float64)).mul_(radius * 2.0**-52)

    def int32_uniform(self, count: int) -> torch.Tensor:
        """count int32 values uniform on all of Z/2^32 (two's complement): keystream words as
        they are, one fresh buffer and no pass over it."""
        return torch.frombuffer(self._keystream(count * 4), dtype=torch.int32, count=count)

    def normal(self, shape: Shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normal (Box-Muller on full-mantissa uniforms)."""
        dims = _shape(shape)
        count = math.prod(dims)
        half = (count + 1) // 2
        unit = self._unit(2 * half, torch.float64)
        radius = np.sqrt(-2.0 * np.log1p(-unit[:half]))  # 1 - u in (0, 1]: log is finite
        angle = 2.0 * np.pi * unit[half:]
        values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return torch.from_numpy(values).to(dtype).view(dims)

    def signs(self, shape: Shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """+1 or -1, one random bit each."""
        dims = _shape(shape)
        count = math.prod(dims)
        bits = np.unpackbits(np.frombuffer(self.random_bytes((count + 7) // 8), dtype=np.uint8))
        values = bits[:count].astype(np.float64) * 2.0 - 1.0
        return torch.from_numpy(values).to(dtype).view(dims)

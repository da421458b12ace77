"""An attacker on the Mersenne Twister (what `torch.Generator` is on the CPU): from 624 consecutive
32-bit outputs it rebuilds the generator's whole state and clones it, so every later draw of the
victim (a permutation, a mixing matrix, a one-time mask) is predicted exactly.

The outputs are those of 312 full-range 64-bit draws (`torch.randint(-2**63, 2**63 - 1)`, one
64-bit value = two tempered words, high word first), i.e. 2496 bytes of the generator's output:
the same amount of keystream the test hands to the same attack against `SecretRandom`.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

N = 624
_MASK32 = np.uint64(0xFFFFFFFF)


def _u(value: int) -> np.uint64:
    return np.uint64(value)


def temper(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.uint64) & _MASK32
    y ^= y >> _u(11)
    y ^= (y << _u(7)) & _u(0x9D2C5680)
    y ^= (y << _u(15)) & _u(0xEFC60000)
    y ^= y >> _u(18)
    return y & _MASK32


def untemper(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.uint64) & _MASK32
    y ^= y >> _u(18)
    y ^= (y << _u(15)) & _u(0xEFC60000)
    t = y.copy()
    for _ in range(5):
        t = y ^ ((t << _u(7)) & _u(0x9D2C5680))
    y = t & _MASK32
    t = y.copy()
    for _ in range(3):
        t = y ^ (t >> _u(11))
    return t & _MASK32


def words_from_int64(values: torch.Tensor) -> np.ndarray:
    """The 32-bit words behind full-range int64 draws (value - INT64_MIN = hi << 32 | lo)."""
    raw = values.numpy().astype(np.int64).view(np.uint64) + _u(1 << 63)
    words = np.empty(2 * raw.size, dtype=np.uint64)
    words[0::2] = raw >> _u(32)
    words[1::2] = raw & _MASK32
    return words


def clone_torch_generator(words: np.ndarray) -> torch.Generator:
    """A torch.Generator in the victim's state right after it produced `words` (624 words, the
    last block it generated): the next draw of the clone is the victim's next draw."""
    assert words.size == N
    clone = torch.Generator()
    state = bytearray(clone.get_state().numpy().tobytes())
    # CPUGeneratorImplState: int64 seed, int32 left, int32 seeded, uint64 next, uint64 state[624]
    struct.pack_into("<qiiQ", state, 0, 0, 1, 1, N)
    state[24 : 24 + N * 8] = untemper(words).astype("<u8").tobytes()
    clone.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return clone


def predicts_next_words(words: np.ndarray, following: np.ndarray) -> float:
    """The share of `following` words that the MT recurrence predicts from the 624 `words`."""
    state = list(untemper(words).astype(np.uint64).tolist())
    hits = 0
    for i, actual in enumerate(following.tolist()):
        upper = state[i] & 0x80000000
        lower = state[i + 1] & 0x7FFFFFFF
        mixed = upper | lower
        value = state[i + 397] ^ (mixed >> 1) ^ (0x9908B0DF if mixed & 1 else 0)
        state.append(value)
        hits += int(temper(np.array([value]))[0]) == int(actual)
    return hits / max(len(following), 1)

"""Print what the GPU targets ask of a `bench --local` JSON: speed-ups over
`tee-only`, the obfuscation ratios, the worst error. Used by tests/hardware/gpu_check.sh.

    python -m tests.hardware.gpu_ratios RESULT.json
Exit status 0 whatever the figures (the script reports, the reader judges); 2 on a bad file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SPEEDUP_TARGET = 5.0  # plain-offload and groupcover-nomask vs tee-only, BERT-base 8 x 128
ERROR_TARGET = 1e-4
PAIRS = (("groupcover-nomask", "plain-offload"), ("groupcover", "mask-only"))


def _ratio(by_mode: dict[str, dict[str, Any]], top: str, bottom: str) -> float | None:
    if top not in by_mode or bottom not in by_mode:
        return None
    paired = (by_mode[top].get("paired_ratios") or {}).get(bottom)
    if paired:
        return float(paired["median"])
    return float(by_mode[top]["latency_ms"]["median"] / by_mode[bottom]["latency_ms"]["median"])


def lines(document: dict[str, Any]) -> list[str]:
    results = document["results"]
    by_mode = {r["mode"]: r for r in results}
    host = document.get("host", {})
    out = [f"device: {host.get('cuda') or 'no CUDA in the master process'}; master threads "
           f"{document.get('settings', {}).get('threads', '?')}"]  # fmt: skip
    for r in results:
        err = r.get("rel_err", 0.0)
        out.append(f"{r['mode']:18s} median {r['latency_ms']['median']:9.1f} ms  "
                   f"{r['throughput']:8.2f} samples/s  rel err {err:.1e}")  # fmt: skip
    for mode in ("plain-offload", "groupcover-nomask", "mask-only", "groupcover"):
        speedup = _ratio(by_mode, "tee-only", mode)
        if speedup is not None:
            verdict = (
                ""
                if mode in ("mask-only", "groupcover")
                else (
                    " (target >= 5x: met)"
                    if speedup >= SPEEDUP_TARGET
                    else " (target >= 5x: MISSED)"
                )
            )
            out.append(f"tee-only / {mode} = {speedup:.2f}x faster offloaded{verdict}")
    for top, bottom in PAIRS:
        ratio = _ratio(by_mode, top, bottom)
        if ratio is not None:
            out.append(f"{top} / {bottom} = {ratio:.3f}")
    worst = max((r.get("rel_err", 0.0) for r in results if r["mode"] != "tee-only"), default=0.0)
    out.append(f"worst rel err {worst:.1e} (target <= {ERROR_TARGET:.0e}: "
               f"{'met' if worst <= ERROR_TARGET else 'MISSED'})")  # fmt: skip
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.hardware.gpu_ratios RESULT.json", file=sys.stderr)
        return 2
    try:
        document = json.loads(Path(argv[0]).read_text())
        text = lines(document)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"gpu_ratios: cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Model packages: what the model owner's machine writes for workers and for the master.

`layout` (the file names and format version that writer and readers share), `build` (protect:
SRC -> DIR/), `source` (what SRC may be, and the model's skeleton), `secrets` (a layer's secrets
as JSON + tensors), `container` (the bundle's plaintext: one safetensors blob), `seal` (chunked
AES-256-GCM under the model key), `runtime` (open, unseal, build a mode without obfuscating),
`keys` (the model key from a file or a KBS broker), `prepare` (a run's `ModelRequest` -> the
unsealed packages its modes run from). published.safetensors is read and written by
`groupcover.published`, which the worker uses too. DESIGN.md, "Model packages", describes the
layout and the flow.
"""

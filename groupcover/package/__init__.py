"""Model packages: what the model owner's machine writes for workers and for the master.

`build` (protect: SRC -> DIR/), `source` (what SRC may be, and the model's skeleton), `secrets`
(a layer's secrets as JSON + tensors), `container` (the bundle's plaintext: one safetensors
blob), `seal` (chunked AES-256-GCM under the model key), `published` (published.safetensors:
checked reads and digests), `runtime` (open, unseal, build a mode without obfuscating), `keys`
(the model key from a file or a KBS broker). DESIGN.md, "Model packages", describes the layout
and the flow.
"""

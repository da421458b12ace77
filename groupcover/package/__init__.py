"""Model packages: what the model owner's machine writes for workers and for the master.

`seal`: the master's sealed bundle format (chunked AES-256-GCM under the model key).
"""

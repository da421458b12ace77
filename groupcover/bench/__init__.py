"""The benchmark a master runs: every mode on the same inputs, interleaved, checked against the
plaintext model, timed per forward, written as JSON and shown as a table.

`run` (the mode engine: build each mode, interleaved forwards, one result per mode), `stats`
(a mode's measurements and the figures made of them), `report` (host facts, the JSON file, the
table), `local` (`bench --local`: master and worker as processes on loopback), `micro`
(`bench --micro`: de-obfuscation against a plain linear layer). The model a run needs is made
ready by `groupcover.package.prepare`; the run's settings stay in `groupcover.launch`, which
calls into this package with plain arguments.
"""

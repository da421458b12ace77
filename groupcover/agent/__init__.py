"""The locked master's only door: a job agent that runs the framework's master rank.

A locked master (kernel command line `gcvm.locked=1`, part of the launch measurement) runs no
SSH server and accepts no code after boot. What the host may still ask of it goes through this
agent, which treats every byte as untrusted input:

- `jobs`: what a job may say (the master rank's flags, an explicit allowlist with a checked value
  for each; everything that decides trust is not a flag here) and the environment it runs in;
- `server`: the HTTP server (stdlib `http.server`): package files in, one job at a time, its
  output lines and its results file out.

No torch is imported here: the agent answers within a second of boot on a slow CPU.
"""

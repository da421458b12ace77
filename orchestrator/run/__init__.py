"""`gcvm run`: the framework's ranks (or the seed's scripts) across the cluster's VMs.

The orchestrator computes each rank's settings from the cluster state (rendezvous address, the
guest's own interface name, the worker each master offloads to) and starts the framework's single
entry point, `python -m groupcover launch ...`, over SSH: workers first, then masters. It never
imports the framework; it reads back the JSON each master writes.

- `settings`: every option of the run verbs, declared once (flag, default, help, bounds, the
  framework's flag), and the validated `BenchSettings`;
- `world`: the ranks of one run and what a result says of the cluster;
- `ranks`: the running ranks, started, watched and stopped together;
- `deploy`: the model packages of a run (protected on the host, copied into the VMs) and what
  the ranks are told of them and of the key broker;
- `session`: the skeleton every run verb shares (lock, state, SSH, broker, sampler, cleanup);
- `bench`, `exec`, `micro`: the verbs, each only what differs.
"""

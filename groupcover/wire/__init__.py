"""The master <-> worker wire: a fixed binary schema, the TCP transport and worker server, and a
data-only rendezvous store. Nothing on it is ever unpickled or executed."""

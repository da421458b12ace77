"""The master <-> worker wire: a fixed binary schema (`schema`), the byte layer (`sockets`), the
master's transport that runs in the TEE (`client`), the worker's server (`server`), a data-only
rendezvous store (`store`) and one rank's life in a world (`world`). Nothing on it is ever
unpickled or executed."""

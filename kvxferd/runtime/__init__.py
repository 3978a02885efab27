"""The runtime: the only place with sockets, threads and clocks (daemons, barrier service, peers)."""

"""A real federation's processes: SuperLink/SuperNode commands, connections, TLS
certificates (`edgekd.fleet.processes`, `edgekd.fleet.certs`)."""

"""The listening address of `realtime serve`: a check before any worker
starts, the one-line messages for an address that cannot be bound, and the
exit statuses that carry that news from a worker to its supervisor."""
from __future__ import annotations

import errno
import socket

# Exit statuses of `realtime serve`: 2 for a refused option (as argparse does),
# 1 when the server cannot run. A worker that cannot bind exits with
# EXIT_PORT_TAKEN so that the supervisor gives up at once instead of
# restarting it in a loop.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PORT_TAKEN = 3


def port_problem(host: str, port: int) -> str | None:
    """Whether something already listens on host:port. Checked before any
    worker starts, so that a taken port is one clear line and not a crash
    loop. SO_REUSEADDR lets the probe bind past TIME_WAIT leftovers of a
    previous run, but not past a listener (Linux); without SO_REUSEPORT it
    cannot join another server's port group either."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"--host {host}: cannot be resolved ({e.strerror})"
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                return bind_error(host, port, e)
    return None


def bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (f"cannot listen on {host}:{port}: the address is already in use "
                "(is another server running there?); stop it or pass another --port")
    if e.errno == errno.EACCES:
        return f"cannot listen on {host}:{port}: permission denied (ports below 1024 need privileges)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: no such address on this machine (--host)"
    return f"cannot listen on {host}:{port}: {e.strerror or e}"


def port_taken(host: str, port: int) -> str:
    return bind_error(host, port, OSError(errno.EADDRINUSE, "address in use"))

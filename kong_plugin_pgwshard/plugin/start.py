"""`pgwshard-plugin`'s entry point: the socket Kong connects to exists before anything slow.

Kong spawns the plugin server from worker 0 as it starts (and on every `kong reload`) and
proxies at once: a request whose worker has no plugin instance yet calls StartInstance, and if
the socket does not exist that call fails and Kong answers 500 (`plugin.lua`: "starting
instance: no such file or directory"). Importing the plugin server takes 100-200 ms (kong-pdk,
requests, msgpack); binding a unix socket takes microseconds. So this module imports only the
standard library, binds and listens first, then imports the server: a StartInstance that comes
meanwhile waits in the listen queue, within Kong's read timeout, and is answered.

Binding first still loses the race at a cold `kong start`: Kong's workers proxy before worker
0's timer has even spawned this process. With `--dump --hold-socket` (kong.conf's query_cmd),
Kong's master binds the socket before it forks any worker and a small holder keeps it until
this server claims it (listener.py); the server then serves what queued meanwhile.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from . import listener

SOCKET_NAME = "pgwshard.sock"  # "<plugin name>.sock", as kong-pdk's dedicated servers name theirs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pgwshard-plugin", description="The pgwshard Kong plugin server.")
    parser.add_argument("-p", "--kong-prefix", "-kong-prefix", dest="prefix", default="/usr/local/kong/",
                        help="directory of the unix socket (default: %(default)s)")
    parser.add_argument("--socket-name", default=SOCKET_NAME, help="socket file name (default: %(default)s)")
    parser.add_argument("--listen-queue-size", type=int, default=4096)
    parser.add_argument("--socket-mode", type=_octal, help="the socket's mode, e.g. 0660 for nginx workers in "
                                                          "this server's group (default: from the umask)")
    parser.add_argument("--no-parent-watchdog", dest="follow_parent", action="store_false",
                        help="run under a supervisor (systemd, a container's init): do not exit when the "
                             "parent process does (a server started by init never follows it)")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more logging, repeatable")
    parser.add_argument("--dump", "-dump", action="store_true", help="print the plugin info Kong asks for, and exit")
    parser.add_argument("--hold-socket", action="store_true",
                        help="with --dump (Kong's query_cmd): bind the socket now and keep it in a holder "
                             "process until the server Kong starts claims it, so that no request meets a "
                             "missing socket while that server starts (README, 'Kong starting, reloading and "
                             "restarting the plugin server')")
    return parser.parse_args(argv)


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not a file mode: {text!r}")
    return mode


def listen_unix(path: str, queue_size: int = 4096, mode: int | None = None) -> socket.socket:
    """The listening socket at path: a holder's, claimed, else a new one replacing what is there
    in one step (a previous server's socket: it notices and drains, see rpc.RPCServer)."""
    return listener.claim(path) or listener.bind_unix(path, queue_size, mode)


def main(argv: list[str] | None = None) -> None:
    parent = os.getppid()  # before anything else: Kong may exit while this server loads
    args = parse_args(argv)
    bound = None
    if args.hold_socket and not args.dump:
        sys.exit("pgwshard-plugin: --hold-socket goes with --dump (Kong's query_cmd)")
    path = os.path.join(args.prefix, args.socket_name)
    if args.hold_socket:
        try:
            listener.hold(path, args.listen_queue_size, args.socket_mode,
                          kong_pid_file=os.path.join(args.prefix, "pids", "nginx.pid"))
        except OSError as err:  # Kong still needs the plugin info: start without a holder
            print(f"pgwshard-plugin: cannot hold {path} for the server: {err}", file=sys.stderr)
    elif not args.dump:
        if not os.path.isdir(args.prefix):
            sys.exit(f"pgwshard-plugin: the prefix {args.prefix} is not a directory")
        bound = listen_unix(path, args.listen_queue_size, args.socket_mode)
    from .server import run  # the slow imports, once Kong can connect
    run(args, bound, path, parent if args.follow_parent and parent != 1 else None)


if __name__ == "__main__":
    main()

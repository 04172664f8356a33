"""`pgwshard host render|run`: the nginx + Lua host under the user's own nginx.

    pgwshard host render --prefix DIR --listen ADDR --plugin-config FILE --upstream IP:PORT,...
        write DIR/nginx.conf (complete: Lua paths, worker user, push limits) and DIR/host.json,
        then check them with `nginx -t`
    pgwshard host run ...the same arguments...
        render, check, and run nginx in the foreground (for systemd or a container)
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from .render import HostRenderError, PushLimits, render

__all__ = ["add_parser"]

DEFAULT_SOCKET = "/run/pgwshard/pgwshard.sock"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add `host render` and `host run` to the `pgwshard` command's subcommands."""
    host = commands.add_parser("host", help="render or run the nginx + Lua host (pgwshard without Kong)")
    actions = host.add_subparsers(dest="host_command", required=True)
    for name, run, text in [("render", _render, "write nginx.conf and host.json into --prefix, check with nginx -t"),
                            ("run", _run, "render, check, and run nginx in the foreground")]:
        p = actions.add_parser(name, help=text)
        _add_arguments(p)
        p.set_defaults(run=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = PushLimits()
    p.add_argument("--prefix", required=True, help="nginx's prefix: the rendered files, pid, logs, temp files")
    p.add_argument("--listen", required=True, help="where pushes arrive, as nginx's listen takes it (0.0.0.0:9091)")
    p.add_argument("--plugin-config", required=True,
                   help="the plugin's config, a JSON file (watched: a change starts a new plugin instance)")
    p.add_argument("--upstream", required=True,
                   help="pushgateways as IP:PORT,... for requests the plugin leaves alone (reads)")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="the plugin server's socket (default: %(default)s)")
    p.add_argument("--workers", default="auto", help="nginx worker processes (default: %(default)s)")
    p.add_argument("--user", help="the workers' user when nginx starts as root (default: www-data, else nobody)")
    p.add_argument("--group", help="the workers' group: one that may connect to the socket "
                                   "(default: the socket's group, else its directory's)")
    p.add_argument("--lua-path", action="append", default=[], metavar="DIR",
                   help="a directory holding resty/core.lua, MessagePack.lua or cjson.so, searched before "
                        "the usual ones (repeatable)")
    p.add_argument("--connect-timeout", default=defaults.connect_timeout, help="to a pushgateway (default: %(default)s)")
    p.add_argument("--read-timeout", default=defaults.read_timeout,
                   help="a pushgateway's answer; a hung one gives 504 after this (default: %(default)s)")
    p.add_argument("--body-limit", default=defaults.body_limit, help="largest push body (default: %(default)s)")
    p.add_argument("--header-buffer", default=defaults.header_buffer,
                   help="largest request line, i.e. push path (default: %(default)s)")
    p.add_argument("--deletes", metavar="HOST:PORT",
                   help="pgwshard-sync's delete API (its deletes.listen): DELETEs go there, so an absent "
                        "owner's deletes stick (README, Deletes)")
    p.add_argument("--fail-fast", action="store_true",
                   help="answer 503 when the plugin server fails, instead of Kong's way (the upstream's own balancing)")
    p.add_argument("--nginx", default="nginx", help="the nginx binary (default: %(default)s)")


def _upstream(text: str) -> list[str]:
    members = [m.strip() for m in text.split(",") if m.strip()]
    for member in members:
        host, _, port = member.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            if not 0 < int(port) < 65536:
                raise ValueError(port)
        except ValueError:
            raise HostRenderError(f"--upstream: {member!r} is not IP:PORT (nginx's balancer takes no names)") from None
    if not members:
        raise HostRenderError("--upstream: no pushgateway given")
    return members


def _render_checked(args: argparse.Namespace) -> Path:
    limits = PushLimits(connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
                        send_timeout=args.read_timeout, body_limit=args.body_limit, header_buffer=args.header_buffer)
    conf = render(args.prefix, args.listen, args.socket, Path(args.plugin_config), _upstream(args.upstream),
                  args.workers, user=args.user, group=args.group, lua_path=args.lua_path, limits=limits,
                  deletes=args.deletes, host_settings={"fail_fast": True} if args.fail_fast else None)
    check = subprocess.run(_nginx_argv(args, conf) + ["-t", "-q"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise HostRenderError(f"nginx -t refused {conf}:\n{check.stderr.strip()}")
    return conf


def _nginx_argv(args: argparse.Namespace, conf: Path) -> list[str]:
    prefix = str(conf.parent)
    # -e: nginx opens its built-in error log before reading the config; this one is ours
    return [args.nginx, "-p", prefix, "-c", str(conf), "-e", os.path.join(prefix, "error.log")]


def _render_or_say_why(args: argparse.Namespace) -> Path | None:
    try:
        return _render_checked(args)
    except (HostRenderError, OSError) as err:
        print(f"pgwshard host: {err}", file=sys.stderr)
        return None


def _render(args: argparse.Namespace) -> int:
    conf = _render_or_say_why(args)
    if conf is None:
        return 1
    print(conf)
    return 0


def _run(args: argparse.Namespace) -> int:
    conf = _render_or_say_why(args)
    if conf is None:
        return 1
    argv = _nginx_argv(args, conf) + ["-g", "daemon off;"]
    os.execvp(argv[0], argv)  # nginx becomes this process: signals and exit status are its own
    return 1  # not reached

"""Renders the host's nginx.conf and its config files from the template shipped beside it.

The rendered nginx.conf is complete (nginx -p <prefix> -c <prefix>/nginx.conf runs it) and sets
what nginx's defaults get wrong for pushes: a hung pushgateway would hold a push for
proxy_read_timeout (60 s), a push over client_max_body_size (1 MiB) gets 413, and a grouping
key over large_client_header_buffers (8 KiB) gets 414.
"""
from __future__ import annotations

import glob
import grp
import json
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

HOST_DIR = Path(__file__).resolve().parent  # the Lua modules and nginx.conf.template

__all__ = ["HOST_DIR", "HostRenderError", "PushLimits", "find_lua_dirs", "render", "worker_identity"]

# Where Debian, Ubuntu, Fedora, Alpine, /usr/local and OpenResty put Lua 5.1 modules (LuaJIT is
# 5.1): searched in order after the directories the caller names. `*` stands for the
# architecture's multiarch directory (x86_64-linux-gnu, aarch64-linux-gnu, ...).
LUA_DIRS = ["/usr/local/openresty/lualib", "/usr/local/share/lua/5.1", "/usr/share/lua/5.1",
            "/usr/local/lib/lua/5.1", "/usr/lib/*/lua/5.1", "/usr/lib64/lua/5.1", "/usr/lib/lua/5.1"]
# The modules the host needs, and the Debian package of each.
LUA_MODULES = {"resty/core.lua": "lua-resty-core", "MessagePack.lua": "lua-messagepack",
               "cjson.so": "lua-cjson"}
NGINX_MODULE_DIRS = ["/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/share/nginx/modules",
                     "/usr/local/nginx/modules", "/etc/nginx/modules"]


class HostRenderError(ConfigError):
    """The host cannot be rendered as asked: names what is missing and how to fix it."""


@dataclass(frozen=True)
class PushLimits:
    """What nginx's defaults get wrong for pushes (nginx syntax for sizes and times)."""

    connect_timeout: str = "2s"    # to a pushgateway; a dead one fails fast
    read_timeout: str = "10s"      # a hung pushgateway: 504 after this, not a push held 60 s
    send_timeout: str = "10s"
    body_limit: str = "16m"        # client_max_body_size; nginx's 1m gives 413 to real pushes
    header_buffer: str = "64k"     # large_client_header_buffers; 8k gives 414 to long grouping keys


def find_lua_dirs(extra: list[str] | tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(lua_package_path dirs, lua_package_cpath dirs) holding the modules the host needs,
    searched in `extra` first, then in LUA_DIRS; HostRenderError names what is missing."""
    candidates: list[str] = []
    for pattern in [*extra, *LUA_DIRS]:
        candidates += sorted(glob.glob(pattern)) if "*" in pattern else [pattern]
    path_dirs: list[str] = []
    cpath_dirs: list[str] = []
    missing = []
    for module, package in LUA_MODULES.items():
        found = next((d for d in candidates if os.path.isfile(os.path.join(d, module))), None)
        if found is None:
            missing.append(f"{module} (Debian: {package})")
            continue
        dirs = cpath_dirs if module.endswith(".so") else path_dirs
        if found not in dirs:
            dirs.append(found)
    # the caller's directories first: a module they name wins over the system's copy
    path_dirs.sort(key=candidates.index)
    cpath_dirs.sort(key=candidates.index)
    if missing:
        raise HostRenderError(f"Lua modules not found: {', '.join(missing)}; searched "
                              f"{', '.join([*extra, *LUA_DIRS])}; name their directory with --lua-path")
    return path_dirs, cpath_dirs


def _nginx_modules() -> list[str]:
    """load_module lines for the Lua module when nginx has it as a dynamic module (Debian);
    none when it is built in (OpenResty)."""
    for directory in NGINX_MODULE_DIRS:
        lua = os.path.join(directory, "ngx_http_lua_module.so")
        if os.path.isfile(lua):
            ndk = os.path.join(directory, "ndk_http_module.so")
            return [f"load_module {m};" for m in (ndk, lua) if os.path.isfile(m)]
    return []


def worker_identity(socket: str, user: str | None = None, group: str | None = None) -> tuple[str, str] | None:
    """The (user, group) nginx workers run as, or None when nginx does not run as root (its
    workers then run as the user who starts it and a `user` line is ignored).

    Never root: by default www-data (else nobody), in the group of the plugin server's socket
    (else of its directory, else the user's own), so that a socket of mode 0660 is enough."""
    if os.geteuid() != 0:
        return None
    if user is None:
        user = next((u for u in ("www-data", "nginx", "nobody") if _exists(pwd.getpwnam, u)), "nobody")
    if user == "root" or (_exists(pwd.getpwnam, user) and pwd.getpwnam(user).pw_uid == 0):
        raise HostRenderError("nginx workers must not run as root: name another --user")
    if group is None:
        for path in (socket, os.path.dirname(socket)):
            try:
                gid = os.stat(path).st_gid
            except OSError:
                continue
            if gid != 0:
                group = grp.getgrgid(gid).gr_name
                break
    if not _exists(pwd.getpwnam, user):
        raise HostRenderError(f"--user: no user {user!r} on this machine")
    if group is None:
        group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    if not _exists(grp.getgrnam, group):
        raise HostRenderError(f"--group: no group {group!r} on this machine")
    return user, group


def _exists(lookup, name: str) -> bool:
    try:
        lookup(name)
        return True
    except KeyError:
        return False


def _check_reachable(path: str, identity: tuple[str, str], write: bool, what: str) -> None:
    """HostRenderError when the workers' user and group could not reach path (every directory
    searchable, the file readable, or for a socket writable)."""
    user, group = identity
    uid = pwd.getpwnam(user).pw_uid
    gids = {grp.getgrnam(group).gr_gid, pwd.getpwnam(user).pw_gid}
    gids |= {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}

    def allowed(st: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & bits[0])
        if st.st_gid in gids:
            return bool(st.st_mode & bits[1])
        return bool(st.st_mode & bits[2])

    target = Path(path)
    for directory in reversed(target.parents):
        if not allowed(os.stat(directory), (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            raise HostRenderError(f"nginx workers ({user}:{group}) cannot enter {directory}, on the way to "
                                  f"{what} {path}: give them search permission (or choose --user/--group)")
    bits = (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH) if write else (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    if not allowed(os.stat(target), bits):
        mode = f"{stat.S_IMODE(os.stat(target).st_mode):04o}"
        hint = ("start pgwshard-plugin with --socket-mode 0660 in a group the workers have (--group)"
                if write else "make it readable to them")
        raise HostRenderError(f"nginx workers ({user}:{group}) cannot {'connect to' if write else 'read'} "
                              f"{what} {path} (mode {mode}): {hint}")


def render(prefix: str, listen: str, socket: str, plugin_config: dict | os.PathLike, upstream: list[str],
           workers: int = 2, read_timeout_ms: int = 5000, keepalive_pool: int = 64, *,
           user: str | None = None, group: str | None = None, lua_path: list[str] | tuple[str, ...] = (),
           limits: PushLimits = PushLimits(), host_settings: dict | None = None,
           deletes: str | None = None) -> Path:
    """Write nginx.conf and the host config into prefix; returns nginx.conf.

    plugin_config: the plugin's config, written to <prefix>/plugin-config.json, or the path of a
    JSON file the host reads (and watches) instead. user/group: the workers' (see
    worker_identity). lua_path: directories searched first for the Lua modules the host needs.
    host_settings: more keys of the host config (kong/openresty/README.md lists them, e.g.
    `fail_fast`, `hash_on`, `connect_timeout_ms`); they win over the arguments above.
    deletes: pgwshard-sync's delete API (host:port, its `deletes.listen`): every DELETE goes
    there, so it keeps a tombstone (README "Deletes"); the plugin still answers a bad push path."""
    base = Path(prefix).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if isinstance(plugin_config, dict):
        plugin_config_file = base / "plugin-config.json"
        plugin_config_file.write_text(json.dumps(plugin_config))
    else:
        plugin_config_file = Path(plugin_config).resolve()
        try:
            json.loads(plugin_config_file.read_text())
        except (OSError, ValueError) as err:
            raise HostRenderError(f"plugin config {plugin_config_file}: {err}") from None
    path_dirs, cpath_dirs = find_lua_dirs(list(lua_path))
    identity = worker_identity(socket, user, group)
    # The workers load the Lua from the prefix, which they must reach anyway: a package installed
    # where they cannot (a virtualenv under /root) still works, and a re-render upgrades it.
    lua_dir = base / "lua"
    lua_dir.mkdir(exist_ok=True)
    for module in HOST_DIR.glob("*.lua"):
        shutil.copyfile(module, lua_dir / module.name)
    host_config = base / "host.json"
    host_config.write_text(json.dumps({
        "socket": socket, "plugin": "pgwshard", "plugin_config_file": str(plugin_config_file),
        # the plugin server's timeouts of the shipped kong.conf (nginx_proxy_lua_socket_*), not
        # Kong's 60 s: a hung plugin server holds a push 5 s at most, then Kong's way applies
        "upstream": upstream, "connect_timeout_ms": 1000, "send_timeout_ms": 5000,
        "read_timeout_ms": read_timeout_ms, "keepalive_pool": keepalive_pool,
        "config_check_interval": 0.5, **(host_settings or {})}))
    if identity is not None:
        for path, what in [(lua_dir / "pgwshard_host.lua", "the host's Lua"), (host_config, "the host config"),
                           (plugin_config_file, "the plugin config")]:
            _check_reachable(str(path), identity, False, what)
        if os.path.exists(socket):
            _check_reachable(socket, identity, True, "the plugin server's socket")
    values = {
        "load_modules": "\n".join(_nginx_modules()),
        "user": (f"user {identity[0]} {identity[1]};" if identity else
                 "# no `user`: nginx does not run as root, its workers run as the user who starts it"),
        "workers": workers, "prefix": base, "host_config": host_config, "listen": listen,
        "lua_package_path": ";".join(f"{d}/?.lua" for d in [str(lua_dir), *path_dirs]) + ";;",
        "lua_package_cpath": ";".join(f"{d}/?.so" for d in cpath_dirs) + ";;",
        "connect_timeout": limits.connect_timeout, "read_timeout": limits.read_timeout,
        "send_timeout": limits.send_timeout, "body_limit": limits.body_limit, "header_buffer": limits.header_buffer,
        # A DELETE leaves `location /` in the rewrite phase, before the plugin's access phase,
        # for a location without the plugin: Kong's pgwshard-deletes route is a service of its
        # own (kong/kong.yml), so the plugin server never sees a delete, and a plugin server
        # that is down does not fail one.
        "deletes": ("            error_page 418 = @pgwshard_deletes;\n"
                    "            if ($request_method = DELETE) { return 418; }" if deletes else ""),
        "deletes_location": ("        location @pgwshard_deletes {\n"
                             f"            proxy_pass http://{deletes};\n"
                             "        }" if deletes else ""),
    }
    text = (HOST_DIR / "nginx.conf.template").read_text()
    for name, value in values.items():
        text = text.replace("{{%s}}" % name, str(value))
    conf = base / "nginx.conf"
    conf.write_text(text)
    return conf

#!/usr/bin/env bash
# Builds Kong 3.9.3 from the offline kit beside the repo (../shared/kong-3.9.3: its sources and
# build.sh; no Kong package or image is reachable here) and prints the path of its `kong`.
# Cached outside the repo: the kit's build.sh returns at once when the build is current.
# As root the cache is /var/cache/pgwshard, not ~/.cache: Kong's workers and the plugin server
# they spawn run as an unprivileged user, who must read Kong's Lua tree (/root is 0700).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kit="${PGWSHARD_KONG_KIT:-$here/../../shared/kong-3.9.3}"
if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/pgwshard; else default_cache="${XDG_CACHE_HOME:-$HOME/.cache}/pgwshard"; fi
prefix="${PGWSHARD_KONG_CACHE:-$default_cache}/kong-3.9.3"
[ -f "$kit/build.sh" ] || { echo "build-kong: no Kong kit at $kit (../shared/kong-3.9.3)" >&2; exit 1; }
mkdir -p "$(dirname "$prefix")"
bash "$kit/build.sh" "$prefix" >&2
"$prefix/bin/kong" version >&2
echo "$prefix/bin/kong"

#!/usr/bin/env bash
# pgwshard's local stack on one Debian machine: installs what it needs (Debian packages, a
# virtualenv with pgwshard), then runs three pushgateways, the plugin server, the OpenResty host,
# pgwshard-sync on its own probes (with its delete API) and Prometheus; pushes sample groups,
# prints where each went and where to look, and stays up until Ctrl-C. Arguments go to
# local_stack.py (--help: --once, --free-ports). PGWSHARD_VENV: where to make the virtualenv
# (default .venv in the checkout); printed commands name its absolute path.
set -euo pipefail
cd "$(dirname "$0")/../.."

debs=(prometheus-pushgateway prometheus nginx-light libnginx-mod-http-lua lua-resty-core lua-messagepack lua-cjson)
missing=()
for d in "${debs[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
venv="${PGWSHARD_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -e .   # the package alone: the stack needs no test extras
exec "$venv/bin/python" kong/openresty/local_stack.py "$@"

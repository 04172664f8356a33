#!/usr/bin/env bash
# pgwshard's local stack on one Debian machine: installs what it needs (Debian packages, a
# virtualenv with pgwshard), then runs three pushgateways, the plugin server, the OpenResty host
# (--gateway kong: a DB-less Kong node, a Kong 3.9 named by PGWSHARD_KONG or on PATH),
# pgwshard-sync on its own probes (with its delete API) and Prometheus; pushes sample groups,
# prints where each went and where to look, and stays up until Ctrl-C. Arguments go to
# local_stack.py (--help: --once, --free-ports, --gateway). PGWSHARD_VENV: where to make the
# virtualenv (default .venv in the checkout); printed commands name its absolute path.
set -euo pipefail
cd "$(dirname "$0")/../.."

debs=(prometheus-pushgateway prometheus nginx-light libnginx-mod-http-lua lua-resty-core lua-messagepack lua-cjson
      python3-venv)
missing=()
for d in "${debs[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
venv="${PGWSHARD_VENV:-.venv}"
# Debian's python3 where there is one: with --gateway kong started as root, Kong's workers run as
# nobody, and so does the plugin server they spawn from this virtualenv (a python under /root is
# out of their reach).
py=python3; [ -x /usr/bin/python3 ] && py=/usr/bin/python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/pip" install -q -e .   # the package alone: the stack needs no test extras
if [ "$(id -u)" = 0 ] && ! runuser -u nobody -- "$venv/bin/python" -c "import kong_plugin_pgwshard" 2>/dev/null; then
  export PGWSHARD_KONG_USER="root root"   # nobody cannot run this virtualenv: Kong's workers stay root
fi
exec "$venv/bin/python" kong/openresty/local_stack.py "$@"

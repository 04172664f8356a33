#!/usr/bin/env bash
# Builds a real Consul from the Go module proxy for the tests (Consul is not packaged on
# Debian, PyPI or npm). `go install ...@version` refuses Consul because its go.mod has replace
# directives, so a tiny wrapper module requires it and builds the main package. Replace and
# exclude lines of a dependency are ignored by Go, so the wrapper repeats Consul's exclude lines;
# its replace lines point at its own sub-folders (./api, ./sdk, ...), so the wrapper requires
# published versions of those modules instead. Consul v1.22.7's own ./api folder is newer than the
# api v1.33.7 its go.mod names (it uses ACLToken.Name, first published in api v1.34.1), hence the
# explicit api pin below.
# The binary is cached outside the repo and reused; prints its path. Safe to run several times at
# once: each run builds in its own temporary directory and renames its binary into place
# atomically (same filesystem), so a reader never sees half a binary and the last rename wins
# with an identical file.
set -euo pipefail
version="${CONSUL_VERSION:-v1.22.7}"
cache="${PGWSHARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgwshard}"
bin="$cache/consul-$version/consul"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { echo "build-consul: Go is required" >&2; exit 1; }
mkdir -p "$(dirname "$bin")"
work=$(mktemp -d)
# the output goes beside the cached binary: a rename within one filesystem is atomic
out=$(mktemp "$bin.XXXXXX.tmp")
trap 'rm -rf "$work" "$out"' EXIT
cd "$work"
cat > go.mod <<MOD
module pgwshard.local/consulbuild

go 1.25

require (
	github.com/hashicorp/consul $version
	github.com/hashicorp/consul/api ${CONSUL_API_VERSION:-v1.34.1}
)

exclude (
	github.com/hashicorp/go-msgpack v1.1.5
	github.com/hashicorp/go-msgpack v1.1.6
)
MOD
cat > tools.go <<'SRC'
//go:build tools

package tools

import _ "github.com/hashicorp/consul"
SRC
GOFLAGS=-mod=mod go mod tidy -e >&2 2>&1 || true
GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out" github.com/hashicorp/consul >&2
chmod 0755 "$out"
mv -f "$out" "$bin"
echo "$bin"

#!/usr/bin/env bash
# Install and build the benchmark peer hubs (idempotent: does only what is missing).
#
#   bench/peers/setup.sh [PYTHON]
#
# PYTHON: the interpreter that will run websockets_hub.py and smoke.py
# (default: the repository's .venv/bin/python, else python3).
#
# * Go toolchain + gorilla/websocket from Debian (apt-get, as root or via sudo);
#   gorilla_hub is built offline in GOPATH mode against /usr/share/gocode.
# * Node's `ws` (pinned in package.json / package-lock.json) from the npm registry.
# * `websockets` (pinned below) and orjson into PYTHON with pip.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${1:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
WEBSOCKETS_VERSION=${WEBSOCKETS_VERSION:-17.4}
GOPATH_DEBIAN=/usr/share/gocode

say() { echo "setup.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    say "apt-get install $*"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- system packages -------------------------------------------------------------------------
missing=()
command -v go >/dev/null 2>&1 || missing+=(golang-go)
[ -f "$GOPATH_DEBIAN/src/github.com/gorilla/websocket/conn.go" ] ||
    missing+=(golang-github-gorilla-websocket-dev)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    say "warning: node $(node --version); the ws peer is meant for Node.js 20+"
fi

# --- Node: ws --------------------------------------------------------------------------------
want_ws=$(node -p "require('$here/package.json').dependencies.ws")
have_ws=$(node -p "try { require('$here/node_modules/ws/package.json').version } catch { '' }")
if [ "$have_ws" != "$want_ws" ]; then
    say "npm ci (ws $want_ws)"
    (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

# --- Go: gorilla_hub -------------------------------------------------------------------------
bin=$here/gorilla_hub/gorilla_hub
if [ ! -x "$bin" ] || [ "$here/gorilla_hub/main.go" -nt "$bin" ]; then
    say "go build gorilla_hub"
    if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
        export GOCACHE=/tmp/tidings-peers-gocache
    fi
    (cd "$here/gorilla_hub" && GO111MODULE=off GOPATH=$GOPATH_DEBIAN GOFLAGS= \
        go build -trimpath -o gorilla_hub .)
fi

# --- Python: websockets (+ orjson, which tidings uses too) ------------------------------------
if ! "$python" - "$WEBSOCKETS_VERSION" <<'EOF' 2>/dev/null; then
import sys
import orjson  # noqa: F401
import websockets
sys.exit(websockets.__version__ != sys.argv[1])
EOF
    say "pip install websockets==$WEBSOCKETS_VERSION orjson into $python"
    "$python" -m pip install -q "websockets==$WEBSOCKETS_VERSION" orjson
fi

say "ready: go $(go env GOVERSION), gorilla $(dpkg-query -W -f='${Version}' \
golang-github-gorilla-websocket-dev 2>/dev/null || echo '?'), node $(node --version), \
ws $(node -p "require('$here/node_modules/ws/package.json').version"), \
websockets $("$python" -c 'import websockets; print(websockets.__version__)')"

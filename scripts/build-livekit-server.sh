#!/usr/bin/env bash
# Builds the pinned livekit-server (the Go module github.com/livekit/livekit-server, no cgo)
# into .venv/bin/livekit-server for the tests that run a real LiveKit server on loopback.
# It never goes on a device. Skipped when that version is already there. Uses `go` from
# PATH when it is Go >= 1.26 (what this release needs), else fetches that Go toolchain from
# the Go module proxy (golang.org/toolchain) into .venv/go. Run by scripts/setup-dev.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

LIVEKIT_VERSION=1.13.5
GO_TOOLCHAIN=1.26.8
out=.venv/bin/livekit-server

if "$out" --version 2>/dev/null | grep -q "version $LIVEKIT_VERSION\$"; then
  exit 0
fi

go_ok() {  # is "$1" a Go of at least 1.26?
  local v
  v=$("$1" env GOVERSION 2>/dev/null) || return 1
  v=${v#go}
  [ "${v%%.*}" -gt 1 ] || { v=${v#1.}; [ "${v%%[.a-z]*}" -ge 26 ]; }
}

GO=$(command -v go || true)
if [ -z "$GO" ] || ! go_ok "$GO"; then
  GO=.venv/go/bin/go
  if ! go_ok "$GO" 2>/dev/null; then
    case "$(uname -m)" in
      x86_64) arch=amd64 ;;
      aarch64 | arm64) arch=arm64 ;;
      *) echo "no Go toolchain for $(uname -m): install Go >= 1.26" >&2; exit 1 ;;
    esac
    zip="v0.0.1-go$GO_TOOLCHAIN.linux-$arch.zip"
    echo "fetching Go $GO_TOOLCHAIN from the Go module proxy"
    curl -fsSL -o /tmp/go-toolchain.zip "https://proxy.golang.org/golang.org/toolchain/@v/$zip"
    rm -rf .venv/go
    # module zips keep no file modes: every file under bin/ and pkg/tool/ is a program
    .venv/bin/python - "$GO_TOOLCHAIN" "$arch" <<'EOF'
import sys, zipfile, pathlib
version, arch = sys.argv[1:]
prefix = f"golang.org/toolchain@v0.0.1-go{version}.linux-{arch}/"
root = pathlib.Path(".venv/go")
with zipfile.ZipFile("/tmp/go-toolchain.zip") as z:
    for info in z.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        path = root / info.filename[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(z.read(info))
        parts = path.relative_to(root).parts
        if parts[0] == "bin" or parts[:2] == ("pkg", "tool"):
            path.chmod(0o755)
EOF
    rm -f /tmp/go-toolchain.zip
  fi
fi

echo "building livekit-server $LIVEKIT_VERSION with $("$GO" env GOVERSION) (a few minutes, once)"
bin=$(mktemp -d)
CGO_ENABLED=0 GOBIN="$bin" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
  "$GO" install "github.com/livekit/livekit-server/cmd/server@v$LIVEKIT_VERSION"
mv "$bin/server" "$out"
rmdir "$bin"
"$out" --version

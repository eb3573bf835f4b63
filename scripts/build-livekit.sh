#!/usr/bin/env bash
# Builds the pinned livekit-server (Go module github.com/livekit/livekit-server, no cgo) and
# LiveKit SIP (github.com/livekit/sip, cgo with libopus, libopusfile and libsoxr) into
# .venv/bin/ for the tests and benchmarks that run a real LiveKit deployment on loopback.
# Neither goes on a device. Each is skipped when that version is already there. Uses `go`
# from PATH when it is Go >= 1.26 (what these releases need), else fetches that Go
# toolchain from the Go module proxy (golang.org/toolchain) into .venv/go. Run by
# scripts/setup-dev.sh (which installs the C libraries and redis-server first).
set -euo pipefail
cd "$(dirname "$0")/.."

LIVEKIT_VERSION=1.13.5
# the newest LiveKit SIP the Go module proxy serves; it speaks the server's psrpc (v0.7.2)
SIP_VERSION=1.8.0
GO_TOOLCHAIN=1.26.8
out=.venv/bin/livekit-server
sip_out=.venv/bin/livekit-sip
sip_stamp=.venv/bin/.livekit-sip-version

server_ok() { "$out" --version 2>/dev/null | grep -q "version $LIVEKIT_VERSION\$"; }
sip_ok() { [ -x "$sip_out" ] && [ "$(cat "$sip_stamp" 2>/dev/null)" = "$SIP_VERSION" ]; }
if server_ok && sip_ok; then
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

if ! server_ok; then
  echo "building livekit-server $LIVEKIT_VERSION with $("$GO" env GOVERSION) (minutes, once)"
  bin=$(mktemp -d)
  CGO_ENABLED=0 GOBIN="$bin" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
    "$GO" install "github.com/livekit/livekit-server/cmd/server@v$LIVEKIT_VERSION"
  mv "$bin/server" "$out"
  rmdir "$bin"
  "$out" --version
fi

if ! sip_ok; then
  echo "building LiveKit SIP $SIP_VERSION with $("$GO" env GOVERSION) (minutes, once)"
  # from a module that requires it: `go install pkg@version` would also ask the proxy for
  # the module's version list, which it does not serve
  mod=$(mktemp -d)
  target="$PWD/$sip_out"
  printf 'module build\n\ngo 1.26\n\nrequire github.com/livekit/sip v%s\n' "$SIP_VERSION" > "$mod/go.mod"
  (cd "$mod" && CGO_ENABLED=1 GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" \
    "$GO" build -o "$target" github.com/livekit/sip/cmd/livekit-sip)
  rm -rf "$mod"
  echo "$SIP_VERSION" > "$sip_stamp"
  echo "livekit-sip $SIP_VERSION built"
fi

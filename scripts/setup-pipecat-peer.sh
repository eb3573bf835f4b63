#!/usr/bin/env bash
# The benchmark's Pipecat peer (bench/pipecat_peer.py) in its own environment, .venv-pipecat/:
# pipecat-ai 1.14.0 with the extras its local pipeline needs. Its LLM is the benchmark's
# llama_cpp.server, which runs from .venv (bench/peers.py). The appliance's .venv never
# imports pipecat; the GPL piper-tts lives only here.
#
# Extras (pipecat-ai 1.14.0 metadata): whisper (faster-whisper), silero (no extra packages:
# Silero VAD runs on onnxruntime, a core dependency), piper (piper-tts), openai (the
# OpenAI-compatible client; `openai` itself is core). Smart-turn v3 needs no extra: its ONNX
# model ships in the wheel and runs on onnxruntime; "local-smart-turn" pulls torch and
# transformers for the older v2/CoreML analyzers and is not installed.
#
# Usage: scripts/setup-pipecat-peer.sh   (after `make install`; idempotent, quick when done)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-pipecat"
PY="$VENV/bin/python"

if [[ ! -x .venv/bin/python ]]; then
    echo "setup-pipecat-peer: .venv is missing; run 'make install' first" >&2
    exit 1
fi

# what gets installed, pinned; the stamp below holds its hash
REQUIREMENTS=(
    "pipecat-ai[whisper,silero,piper,openai]==1.14.0"
    "faster-whisper==1.2.1"
    "piper-tts==1.8.0"
    "onnxruntime==1.32.0"
)
# everything else pip resolved for them (pip freeze, 2026-12), so a rebuild gets the same set
CONSTRAINTS="
numpy==2.4.6
typing-extensions==4.16.0
aiofiles==25.1.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
attrs==26.1.0
av==18.1.0
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
ctranslate2==4.8.5
docopt==0.6.2
docstring_parser==0.18.0
filelock==4.3.2
flatbuffers==25.12.19
frozenlist==1.8.0
fsspec==2026.9.0
h11==0.16.0
h2==4.4.1
hf-xet==1.8.0
hpack==4.2.0
httpcore==1.0.9
httpcore2==2.16.2
httpx==0.29.0
httpx2==2.16.2
huggingface_hub==2.4.0
hyperframe==6.1.0
idna==3.20
jiter==0.19.0
llvmlite==0.50.0
loguru==0.7.3
loudness==0.2.0
Markdown==3.11.3
MarkupSafe==3.0.4
multidict==7.2.1
num2words==0.5.14
numba==0.68.1
openai==3.60.0
opentelemetry-api==1.45.2
packaging==26.4
pathvalidate==3.3.1
pillow==13.0.0
propcache==0.5.4
protobuf==6.33.6
pycparser==3.12
pydantic==2.14.4
pydantic_core==2.50.5
python-dotenv==1.2.4
requests==2.34.2
resampy==0.4.3
sentencex==1.0.32
sniffio==1.3.1
soundfile==0.13.1
soxr==1.0.0
starlette==1.10.0
tokenizers==0.23.3
tqdm==4.70.1
truststore==0.10.5
typing-inspection==0.4.5
urllib3==2.8.0
wait_for2==0.4.1
websockets==17.4
yarl==1.25.1
"

# the interpreter .venv was made with
BASE_PY="$(.venv/bin/python -c 'import sys; print(sys._base_executable)')"
if [[ ! -x "$PY" ]]; then
    echo "setup-pipecat-peer: creating $VENV"
    "$BASE_PY" -m venv "$VENV"
fi

STAMP="$VENV/.peer-requirements"
WANT="$(printf '%s\n' "${REQUIREMENTS[@]}" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]]; then
    echo "setup-pipecat-peer: installing pipecat-ai 1.14.0"
    CONSTRAINTS_FILE="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS_FILE"' EXIT
    printf '%s\n' "$CONSTRAINTS" >"$CONSTRAINTS_FILE"
    "$PY" -m pip install -q --disable-pip-version-check \
        -c "$CONSTRAINTS_FILE" "${REQUIREMENTS[@]}"
    echo "$WANT" >"$STAMP"
fi

"$PY" -c 'import pipecat, faster_whisper, piper' \
    || { echo "setup-pipecat-peer: $VENV is incomplete" >&2; exit 1; }
echo "setup-pipecat-peer: ready: $PY bench/pipecat_peer.py"

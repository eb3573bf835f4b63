# The two commands of the README: `make demo` and `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint fuzz bench eval bench-latency bench-audio bench-ptt bench-barge-in bench-sip bench-room clean

install:
	bash scripts/setup-dev.sh

demo: install
	$(BIN)/appliance converse --out reply.wav --transcript conversation.json

lint: install
	$(BIN)/ruff check appliance bench tests scripts
	$(BIN)/ruff format --check appliance bench tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

fuzz: install
	$(BIN)/python -m tests.fuzz --cases 100000

# the appliance, livekit-agents at its defaults and Pipecat on the evaluation corpus (bench/README.md)
# each target writes its current result file and adds the run's row to bench/history.md
HISTORY := $(BIN)/python scripts/bench-history.py add

bench: install
	bash scripts/setup-pipecat-peer.sh
	$(BIN)/python -m bench eval --json bench/results.json
	$(HISTORY) bench/results.json

eval: install
	$(BIN)/python -m bench eval --configs appliance --json bench/eval-results.json
	$(HISTORY) bench/eval-results.json

bench-latency: install
	$(BIN)/python -m bench latency --json bench/latency.json --chart bench/latency.png
	$(HISTORY) bench/latency.json

bench-audio: install
	$(BIN)/python -m bench audio --json bench/usbaudio.json
	$(HISTORY) bench/usbaudio.json

bench-ptt: install
	$(BIN)/python -m bench eval --configs appliance,livekit --ptt-release 0,0.1 --spread 30 --json bench/ptt.json
	$(HISTORY) bench/ptt.json

bench-barge-in: install
	$(BIN)/python -m bench barge-in --json bench/barge-in.json
	$(HISTORY) bench/barge-in.json

bench-sip: install
	$(BIN)/python -m bench sip --json bench/sip.json
	$(HISTORY) bench/sip.json

bench-room: install
	$(BIN)/python -m bench room --json bench/room.json
	$(HISTORY) bench/room.json

clean:
	rm -rf $(VENV) .venv-pipecat reply.wav conversation.json .pytest_cache .mypy_cache .ruff_cache

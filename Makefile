# The two commands of the README: `make demo` and `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint fuzz bench eval bench-audio bench-ptt bench-barge-in bench-sip bench-room clean

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

bench: install
	$(BIN)/python -m bench latency --json bench/results.json --chart bench/latency.png

eval: install
	$(BIN)/python -m bench eval --json bench/eval-results.json

bench-audio: install
	$(BIN)/python -m bench audio --json bench/usbaudio.json

bench-ptt: install
	$(BIN)/python -m bench ptt --json bench/ptt.json

bench-barge-in: install
	$(BIN)/python -m bench barge-in --json bench/barge-in.json

bench-sip: install
	$(BIN)/python -m bench sip --json bench/sip.json

bench-room: install
	$(BIN)/python -m bench room --json bench/room.json

clean:
	rm -rf $(VENV) reply.wav conversation.json .pytest_cache .mypy_cache .ruff_cache

# fetalscan — the two commands of the README.
#   make demo   grouped CV + final model on the embedded real sample -> runs/demo/
#   make test   the test suite
# Both create .venv (if missing) and install the package with its dependencies.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fetalscan-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fetalscan demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# make serve: install, make the demo model if it is missing, start the web service on
# http://127.0.0.1:8000 (the access token is printed once; FETALSCAN_TOKEN sets your own).
# Extra flags: make serve SERVE_ARGS="--port 8080 --biometry-model runs/biometry/model.pt"
.PHONY: serve
serve: $(STAMP)
	@test -f runs/demo/model.pt || $(BIN)/fetalscan demo
	$(BIN)/fetalscan serve $(SERVE_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/biometry_speed.py
	$(BIN)/python benchmarks/explain_speed.py
	$(BIN)/python benchmarks/cv_speed.py

clean:
	rm -rf runs/demo .pytest_cache

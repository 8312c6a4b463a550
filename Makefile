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

bench: $(STAMP)
	$(BIN)/python benchmarks/biometry_speed.py
	$(BIN)/python benchmarks/explain_speed.py
	$(BIN)/python benchmarks/cv_speed.py

clean:
	rm -rf runs/demo .pytest_cache

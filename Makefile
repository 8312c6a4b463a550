# fetalscan — the two commands of the README.
#   make demo   grouped CV + final model on the embedded real sample -> runs/demo/
#   make test   the test suite
# Both create .venv (if missing) and install the package with its dependencies.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fetalscan-installed

.PHONY: demo test install bench clean system

# Debian packages some parts run for real: Orthanc + its DICOMweb plugin (the PACS round trip),
# Chromium (the browser tests), tesseract (the burned-in text check). Installed with apt-get
# when missing and we are root; otherwise the tests that need them are skipped and say why.
SYSTEM_PACKAGES ?= orthanc orthanc-dicomweb chromium tesseract-ocr

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

install: $(STAMP) system

system:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; } || \
	  echo "could not install$$missing; the tests that need them will be skipped"; \
	else echo "missing Debian packages:$$missing (install them as root: apt-get install$$missing); the tests that need them are skipped"; fi

demo: $(STAMP)
	$(BIN)/fetalscan demo

test: $(STAMP) system
	$(BIN)/python -m pytest -q --durations=25

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

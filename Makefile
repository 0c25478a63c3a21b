# Two commands on a fresh machine:  make demo  and  make test
# Both create (or reuse) the virtual environment .venv with the pinned
# dependencies of pyproject.toml; it is rebuilt when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
CORES  ?= all

.PHONY: install demo test lint dry-run benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps diffdrr==0.6.1  # test reference renderer; see pyproject
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install  ## run the whole pipeline on config.yaml
	$(BIN)/snakemake --cores $(CORES)

APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends

test: install  ## run the test suite (as root it also installs Debian's SLURM and Chromium for the tests)
	@if [ "$$(id -u)" = 0 ]; then bash tests/slurm/start_local_slurm.sh --install-only; fi
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then \
		$(APT_INSTALL) chromium >/dev/null || { apt-get update -q >/dev/null && $(APT_INSTALL) chromium >/dev/null; }; fi
	$(BIN)/python -m pytest

lint: install  ## snakemake's linter
	$(BIN)/snakemake --lint

dry-run: install  ## list the jobs config.yaml would run
	$(BIN)/snakemake --dry-run --quiet rules

benchmark: install  ## speed and memory figures (prints them)
	$(BIN)/python benchmarks/ingest.py

clean:  ## remove outputs (keeps the environment and the download cache)
	rm -rf results resources .snakemake

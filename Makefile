# make test: installs what the tests need (Debian packages, the package itself with its test
# extras, the Rust crates) and runs every check.  .ci/run calls exactly this.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEBS := dnsmasq-base
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: test deps install rust-test lint typecheck pytest clean

test: deps rust-test lint typecheck pytest

deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PIP) install -q -e '.[test]'

rust-test:
	cargo test --quiet
	cargo clippy --quiet --all-targets -- -D warnings

lint:
	$(PYTHON) -m ruff check python tests benches
	cargo fmt --check

typecheck:
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest dma._core

pytest:
	$(PYTHON) -m pytest -q

clean:
	rm -rf target build dist python/dma/*.so .pytest_cache .mypy_cache .ruff_cache

# make torture: the crash tests of tests/test_crash.py with 1,000 kill -9 submission trials
# (figures printed; DMA_CRASH_SEED=N replays a run).
.PHONY: torture
torture:
	DMA_TORTURE_TRIALS=1000 $(PYTHON) -m pytest -q -s tests/test_crash.py

# make bench: installs what the benchmarks need (Debian's dma = C dma, Postfix's smtp-sink
# unpacked into benches/build, a venv with this package built as a release wheel) and runs
# every case against C dma; results in benches/results.json and benches/results.md.
# BENCH_ARGS=--quick for a subset.  Needs root (C dma's config is /etc/dma/dma.conf; the
# original file is restored when the run ends).
.PHONY: bench
bench:
	$(PYTHON) benches/bench.py $(BENCH_ARGS)

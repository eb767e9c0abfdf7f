# The two commands of the README: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages: chromium for the browser tests (Playwright drives it; no browser is downloaded), prometheus
# (with promtool) for the monitoring tests and the demo, wrk for the serving benchmark.
TEST_DEBS := chromium prometheus
BENCH_DEBS := wrk

.PHONY: setup test demo bench clean debs-test debs-bench

# Installs the Debian packages named in $(1) that are missing (as root, or with sudo).
define install_debs
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

debs-test:
	$(call install_debs,$(TEST_DEBS))

debs-bench:
	$(call install_debs,$(BENCH_DEBS))

test: setup debs-test
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/health-mlops demo

bench: setup debs-bench
	$(BIN)/python benchmarks/federation_overhead.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) .health-mlops .pytest_cache screenshots

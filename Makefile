# The two commands of the README: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages: chromium for the browser tests (Playwright drives it; no browser is downloaded), prometheus
# (with promtool) for the monitoring tests and the demo, wrk for the serving benchmark.
TEST_DEBS := chromium prometheus
BENCH_DEBS := wrk

.PHONY: setup test demo bench clean debs-test debs-bench checkov k8s-hospital e2e

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

# checkov pins libraries (packaging) that clash with the project's, so it gets a venv of its own.
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet --disable-pip-version-check checkov

checkov: $(CHECKOV)

test: setup debs-test checkov
	$(BIN)/python -m pytest -q

# A new hospital in the Kubernetes deployment: its overlay and its one line in k8s/hospitals/kustomization.yaml.
K8S ?= k8s
k8s-hospital:
	@test -n "$(ID)" || { echo "usage: make k8s-hospital ID=hospital-6 CITY=Oslo" >&2; exit 2; }
	@test ! -e "$(K8S)/hospitals/$(ID)" || { echo "$(K8S)/hospitals/$(ID) exists already" >&2; exit 2; }
	@mkdir -p "$(K8S)/hospitals/$(ID)"
	@printf '%s\n' "# $(ID): the node template in its own namespace (its id), in $(CITY)." \
		"apiVersion: kustomize.config.k8s.io/v1beta1" "kind: Kustomization" "namespace: $(ID)" \
		"resources: [../../hospital]" "labels:" "  - pairs: {health-mlops/hospital: $(ID)}" \
		"    includeTemplates: true" "configMapGenerator:" "  - name: node-config" "    behavior: merge" \
		"    literals: [CITY_NAME=$(CITY)]" > "$(K8S)/hospitals/$(ID)/kustomization.yaml"
	@printf '  - %s\n' "$(ID)" >> "$(K8S)/hospitals/kustomization.yaml"
	@echo "added $(ID); now create its Secret node-credential (k8s/README.md) and kubectl apply -k $(K8S)"

demo: setup
	$(BIN)/health-mlops demo

bench: setup debs-bench
	$(BIN)/python benchmarks/federation_overhead.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) .venv-checkov .health-mlops .pytest_cache screenshots

# Not in CI (needs a local dockerd, debootstrap and root): build the images from a debootstrapped Debian base,
# run docker-compose.yml, train one federated run, then one prediction.
e2e:
	bash docker/e2e.sh

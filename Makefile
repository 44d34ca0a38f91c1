# catsdogs: two commands set everything up on a fresh machine.
#   make run   -> creates .venv, installs, downloads the data when DATA is not given and
#                 $(DATA_DIR)/PetImages is missing, runs preprocess -> train -> evaluate on $(DATA)
#   make test  -> creates .venv, installs (plus Chromium for the browser test and podman for the
#                 container test), lint + tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where `catsdogs download` puts the images when DATA is not given (the archive's PetImages/ lands
# inside). CATSDOGS_DATA_URL / CATSDOGS_DATA_SHA256 / CATSDOGS_DATA_SIZE point it at a mirror.
DATA_DIR ?= data
DATA ?= $(DATA_DIR)/PetImages
# A preset (src/catsdogs/presets/, shipped in the wheel): effnet_lite12_frozen (default, most
# accurate), effnet_lite0_frozen (quick), effnet_lite0 (fine-tuned), cnn (from scratch), seed (the
# classic small CNN).
MODEL ?= effnet_lite12_frozen
OUT ?= runs/$(MODEL)
STAMP := $(VENV)/.installed
# The CPU torch wheel lies in /opt/wheels on these machines; never let pip fetch a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# The exact version of every package `make` installs (pyproject.toml holds ranges): make test is
# reproducible. `make lock` rewrites it from .venv after a deliberate upgrade there.
CONSTRAINTS := constraints.txt
PRESETS := src/catsdogs/presets
IMAGE ?= catsdogs

.PHONY: install run test lint bench browser container-tools image image-sizes test-container lock clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(FIND_LINKS) -c $(CONSTRAINTS) -e '.[all,dev]'
	@touch $(STAMP)

# After a deliberate upgrade in .venv (and a green make test): pin what is installed now.
lock:
	@{ echo "# Exact versions for make install and the container images (pip install -c $(CONSTRAINTS) ...);"; \
	   echo "# pyproject.toml holds ranges. Written by make lock from a tested .venv: do not edit by hand."; \
	   echo "# torch is the CPU build (the +cpu wheel): pip fails rather than fetch a CUDA torch."; \
	   $(BIN)/python -m pip freeze --exclude-editable --all 2>/dev/null | grep -v -i -E '^(catsdogs|pip|setuptools|wheel)=='; \
	 } > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

# Debian's Chromium for the real-browser test of the web page (Playwright drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and not root: sudo apt-get install chromium"; fi; }

run: $(STAMP)
	@test -f $(PRESETS)/$(MODEL).toml || { echo "MODEL=$(MODEL): no preset $(MODEL); choose one of: $$(ls $(PRESETS) | grep toml | sed 's/.toml//' | tr '\n' ' ')"; exit 2; }
	@if [ "$(origin DATA)" = file ] && [ ! -d "$(DATA)" ]; then \
	  echo "$(DATA) is missing: downloading it first (catsdogs download --output $(DATA_DIR))"; \
	  $(BIN)/catsdogs download --output "$(DATA_DIR)"; fi
	$(BIN)/catsdogs run --config $(MODEL) --data "$(DATA)" --output "$(OUT)"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks container scripts
	$(BIN)/bandit -q -r src

# podman, runc (crun refuses the hybrid cgroups of these machines) and mmdebstrap (a local Debian base
# image, no registry needed) for make image and the container test; container/containers.conf holds
# podman's settings, so nothing under /etc changes.
container-tools:
	@command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    -o DPkg::Lock::Timeout=300 podman runc mmdebstrap >/dev/null; \
	  else echo "podman missing and not root: sudo apt-get install podman runc mmdebstrap (the container test skips)"; fi; }

# Both images (docs/container.md): $(IMAGE):serve (catsdogs[serve]) and $(IMAGE):full (the pipeline, Java).
image: container-tools
	$(PYTHON) container/image.py build --target serve --target full --tag $(IMAGE)

image-sizes: image
	$(PYTHON) container/image.py sizes --tag $(IMAGE)

test: $(STAMP) browser container-tools lint
	$(BIN)/python -m pytest -q --durations=15

# The container test alone (it is part of make test): builds the serve image from a local base.
test-container: $(STAMP) container-tools
	$(BIN)/python -m pytest -q tests/test_container.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache

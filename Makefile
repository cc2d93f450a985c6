# `make run` and `make test` set up .venv on first use, then run the job / the tests.
# On this project's CPU machines torch is the local CPU wheel; on a GPU machine use
# `make TORCH_SPEC=torch ...` (or any torch you already installed into .venv).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench clean-venv system-tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m ddpo_ray.run

# Debian's prometheus server and docker-compose v1 (offline validation of docker-compose.yml),
# for the observability and deployment tests; installed with apt-get when root, else skipped.
system-tools:
	@command -v prometheus >/dev/null && command -v docker-compose >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null; } || \
	  echo "note: prometheus / docker-compose missing and not installable here; their tests are skipped"

test: $(STAMP) system-tools
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The pure tests (no Ray, nothing slow): the loop to run while editing; under a minute here.
# It sets nothing up: run `make test` (or `make run`) once first.
test-fast:
	@test -f $(STAMP) || { echo "no .venv yet: run 'make test' once first"; exit 2; }
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not ray and not slow"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/core.py

clean-venv:
	rm -rf $(VENV)

# `make demo` on a fresh clone: needs only Python 3.11 or newer (and network access for the first install).
# Options of the demo go through DEMO_ARGS, e.g. `make demo DEMO_ARGS="--customers 50 --dataset sparkov"`.

PYTHON ?= python3
VENV ?= .venv
DEMO_ARGS ?=

.PHONY: demo
demo: $(VENV)/.installed
	$(VENV)/bin/posguard-server demo $(DEMO_ARGS)

# Installed once, and again when the dependencies change; the stamp lives in the (ignored) virtualenv.
$(VENV)/.installed: pyproject.toml uv.lock
	@echo "installing posguard and its dependencies into $(VENV) from uv.lock (once; a minute or two)"
	PYTHON=$(PYTHON) UV_PROJECT_ENVIRONMENT=$(VENV) bash scripts/setup.sh
	touch $@

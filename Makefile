# The two commands of the README: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OLDEST ?= .venv-oldest
SOURCES := $(shell find persistproxy twisted -name '*.py' 2>/dev/null) setup.cfg setup.py pyproject.toml etc/persistproxy.toml
# The Redis plugin example, its own distribution, installed into the test venv beside the proxy.
EXAMPLES := $(shell find examples/redis -name '*.py' -not -path '*/tests/*' -not -path '*/build/*' 2>/dev/null) \
	examples/redis/pyproject.toml

.PHONY: run test test-oldest venv lint typecheck unit e2e bench system-deps clean

## run: the proxy on 127.0.0.1:8080 in front of the built-in demo origin
run: $(VENV)/.installed
	@echo
	@echo "  persistproxy listens on http://127.0.0.1:8080/ in front of a demo origin."
	@echo "  Try:   curl -sv http://127.0.0.1:8080/        (Ctrl-C stops it)"
	@echo
	$(BIN)/twistd --nodaemon --pidfile= persistproxy --demo

## test: lint, type-check, unit tests and end-to-end tests against real processes, then the
## unit tests again against the oldest versions setup.cfg allows
test: $(VENV)/.installed-test system-deps
	$(BIN)/ruff check persistproxy tests twisted bench examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests examples/redis/tests
	$(MAKE) --no-print-directory test-oldest

## test-oldest: the unit tests against exactly the lower bounds of setup.cfg's install_requires
## (ci/oldest-constraints.txt), on the installed package (pytest, not python -m pytest, so the
## source tree does not shadow it)
test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/pytest -q tests/unit

venv: $(VENV)/.installed-test

# A real (non-editable) install, as a user gets it: the twistd plugin is found only that way.
$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir .
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

$(VENV)/.installed-test: $(SOURCES) $(EXAMPLES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir '.[test]'
	$(BIN)/python -m pip install -q --no-cache-dir ./examples/redis
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@ $(VENV)/.installed

$(OLDEST)/.installed: $(SOURCES) ci/oldest-constraints.txt
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q -c ci/oldest-constraints.txt '.[test]'
	$(OLDEST)/bin/python -m pip check
	touch $@

system-deps:
	bash scripts/system-deps.sh

bench: $(VENV)/.installed
	bash bench/run.sh

clean:
	rm -rf $(VENV) $(OLDEST) .venv-sslyze build *.egg-info examples/redis/build examples/redis/*.egg-info

# The two commands of the README:  `make demo`  (main job)  and  `make test`  (test suite).
# Both install what they need first, so they work on a fresh machine.
PY ?= python3
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: deps demo test test-gpu report bench
deps:
	@$(PY) .ci/install_deps.py

demo: deps
	$(PY) -m harness demo

test: deps
	$(PY) -m pytest -q tests

# GPU-only tests (on an H100/H200; on the lent machine source .gpu-bundle/activate.sh first)
test-gpu:
	$(PY) -m pytest -q -m gpu tests

report: deps
	$(PY) -m profiling.resources

bench:
	$(PY) -m harness bench

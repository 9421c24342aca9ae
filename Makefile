# Every target works on a fresh machine: `make test` installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: install lint test test-fast demo bench-her2st bench-shift device-check device-wheels clean

install: $(STAMP)

# torch goes in first and pinned: an unpinned resolve would pull the CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install -e '.[reference]' || echo "the encoders' reference implementations did not install: tests/test_reference_encoders.py will skip"
	$(PIP) install -e '.[formats]' || echo "spatialdata-io did not install: the Visium HD fixture's independent reader check will skip"
	touch $@

# The quality gate: ruff, the 400-line limit in hinge_cli/, and `duplicates` where it is installed.
lint: install
	PYTHON=$(PY) tools/quality.sh

# One worker per core (pytest-xdist): the suite's models use one thread each, so two cores halve the wait.
test: install
	$(PY) -m pytest -q -n auto --dist worksteal

# The suite less the tests marked slow (subprocesses, torchrun, retraining, a kill at every write): under a minute.
test-fast: install
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow and not published"

# The whole pipeline on synthetic data with the tiny config, through the real CLI.
demo: install
	$(PY) -m hinge_cli.synthetic.demo --out demo

# HER2ST patient C, baselines and HINGE variants, leave-one-section-out (~72 min of compute on 2 cores; ARGS=--quick: a short smoke run).
bench-her2st: install
	$(PY) benchmarks/her2st/benchmark.py $(ARGS)

# HER2ST folds under simulated shifts of a new patient (thinned counts, stain jitter, blur + JPEG, a wrong µm/px): ridge and
# HINGE, reusing bench-her2st's fold runs where present (15 min from nothing on 2 cores, one seed; ARGS=--quick: 3 min).
bench-shift: install
	$(PY) benchmarks/her2st/shift.py $(ARGS)

# The GPU path end to end on one device (~6 min on an H100); it rewrites docs/gpu.md. ARGS=--device cpu: its tiny CPU run.
device-check:
	tools/device_check.sh --report docs/gpu.md $(ARGS)

# Wheels of what a GPU machine without the internet usually lacks, for `tools/device_check.sh --wheels build/device-wheels`.
device-wheels:
	python3 -m pip download -q -d build/device-wheels anndata openslide-python openslide-bin imagecodecs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo

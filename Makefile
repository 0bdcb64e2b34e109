# Two commands for a newcomer: `make demo` (install, then the smoke run) and `make test`
# (install, then the test suite). Each creates the virtual environment when it is missing and
# installs only when a requirement file changed (stamp files inside the environment).
#
#   make demo                 # .venv + requirements.txt, then train_CIFAR10_ResNet.py --smoke
#   make test                 # .venv + requirements-dev.txt, then the whole test suite
#   make test-fast            # the suite without the tests marked slow
#   make lint                 # ruff check .
#
# Variables: VENV (.venv), PYTHON (python3, creates the environment), TORCH=cuda|cpu (cuda:
# torch/torchvision from PyPI, CUDA builds of several GB; cpu: from PyTorch's CPU wheel index
# first), PYTEST_ARGS (extra pytest options), DEMO_ARGS (extra options of the smoke run).

VENV ?= .venv
PYTHON ?= python3
TORCH ?= cuda
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
DEMO_ARGS ?=

ifeq ($(filter $(TORCH),cpu cuda),)
$(error TORCH must be cpu or cuda, not '$(TORCH)')
endif

BIN := $(VENV)/bin
TORCH_STAMP := $(VENV)/.ancra-torch-$(TORCH)
OTHER_TORCH_STAMP := $(VENV)/.ancra-torch-$(if $(filter cpu,$(TORCH)),cuda,cpu)
RUN_STAMP := $(VENV)/.ancra-requirements
DEV_STAMP := $(VENV)/.ancra-requirements-dev
# torch/torchvision lines of requirements.txt, quoted for the shell (they contain '>=')
TORCH_REQUIREMENTS := $(foreach r,$(shell grep -E '^(torch|torchvision)[<>=!~ ]' requirements.txt),'$(r)')

.DEFAULT_GOAL := help
.PHONY: help demo test test-fast lint

help:
	@echo "make demo       create $(VENV) if missing, install requirements.txt, run the smoke training"
	@echo "make test       create $(VENV) if missing, install requirements-dev.txt, run the test suite"
	@echo "make test-fast  the same without the tests marked slow"
	@echo "make lint       ruff check ."
	@echo "variables: VENV=$(VENV) PYTHON=$(PYTHON) TORCH=$(TORCH) (cuda|cpu) PYTEST_ARGS= DEMO_ARGS="

demo: $(RUN_STAMP)
	$(BIN)/python train_CIFAR10_ResNet.py --smoke $(DEMO_ARGS)

# pytest's exit code 5 (nothing collected) fails too, with a sentence saying why
PYTEST = $(BIN)/python -m pytest -q
NOTHING_COLLECTED = { status=$$?; [ $$status -ne 5 ] || echo "error: pytest collected no tests; check PYTEST_ARGS" >&2; \
	exit $$status; }

test: $(DEV_STAMP)
	$(PYTEST) $(PYTEST_ARGS) || $(NOTHING_COLLECTED)

test-fast: $(DEV_STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS) || $(NOTHING_COLLECTED)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch/torchvision: from PyPI with the other requirements (cuda), or first from the CPU wheel
# index (cpu) so that the PyPI install finds them already satisfied.
$(TORCH_STAMP): | $(BIN)/python
	@if [ -e $(OTHER_TORCH_STAMP) ]; then \
	  echo "error: $(VENV) was installed with the other TORCH setting; remove $(VENV) or pass TORCH=$(if $(filter cpu,$(TORCH)),cuda,cpu)" >&2; \
	  exit 2; fi
ifeq ($(TORCH),cpu)
	$(BIN)/python -m pip install --quiet --index-url $(TORCH_CPU_INDEX) $(TORCH_REQUIREMENTS)
endif
	touch $@

$(RUN_STAMP): requirements.txt $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt requirements.txt $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

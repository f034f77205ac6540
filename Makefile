# Quickstart: `make demo`, `make test`. Every target creates its virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk; a plain `torch` requirement would pull a CUDA build.
TORCH ?= torch==2.13.0
COMPAT_VENV ?= .venv-tf446
COMPAT_TRANSFORMERS ?= transformers==4.46.*
ENGINE_TESTS := tests/test_engine.py tests/test_positions.py tests/test_arch.py tests/test_templates.py tests/test_bad_input.py tests/test_suffix.py tests/test_keys.py tests/test_evaluation.py tests/test_eval_cli.py tests/test_loading.py tests/test_hparams.py

.PHONY: install demo eval test lint bench test-compat ci clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/alphaedit-fast demo

# CounterFact-style metrics on the fact world, 400 edits, AlphaEdit vs P = I (JSON + PNG)
eval: install
	$(BIN)/alphaedit-fast eval --edits 400 --batch-size 20 --out benchmarks/results/factworld-eval

test: install
	$(BIN)/python -m pytest -q tests

# Benchmarks (CPU): the pytest-benchmark suites, then `alphaedit-fast bench` on shapes (a)-(c)
# and the solve at d_k = 3072; JSON lands in benchmarks/results/ (the bench command's own
# default, for users' runs, lies outside the source tree).
RESULTS := benchmarks/results
bench: install
	$(BIN)/python -m pytest -q benchmarks --benchmark-json=$(RESULTS)/pytest-benchmark.json
	$(BIN)/alphaedit-fast bench --shape a-gpt2-6x128 --edits 32 --repeats 3 --solve --out $(RESULTS)
	$(BIN)/alphaedit-fast bench --shape b-gpt2-small --edits 8 --repeats 3 --out $(RESULTS)
	$(BIN)/alphaedit-fast bench --shape c-llama-8x512 --edits 16 --repeats 3 --out $(RESULTS)
	$(BIN)/alphaedit-fast bench --ops --out $(RESULTS)
	$(BIN)/alphaedit-fast bench --stats --shape b-gpt2-small --stats-tokens 20000 --out $(RESULTS)

lint: install
	$(BIN)/ruff check alphaedit_fast kernels tests benchmarks setup.py

# The engine tests once more on transformers 4.46 (decoder layers return tuples there).
$(COMPAT_VENV)/.installed: pyproject.toml setup.py
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(COMPAT_VENV)/bin/pip install -q $(TORCH)
	$(COMPAT_VENV)/bin/pip install -q "$(COMPAT_TRANSFORMERS)"
	$(COMPAT_VENV)/bin/pip install -q --no-build-isolation -e ".[test]"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q $(ENGINE_TESTS)

ci: lint test test-compat

clean:
	rm -rf $(VENV) $(COMPAT_VENV) *.egg-info build

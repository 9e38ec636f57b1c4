# serve_pruned: `make demo` and `make test` do all the set-up they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_SERVE ?= .venv-serve
PY := $(VENV)/bin/python
SP := $(VENV)/bin/serve-pruned
DEMO ?= out/demo
# the demo's quality guard: the strongest of these cuts (with W8A8) whose held-out perplexity stays within this ratio
DEMO_GUARD ?= 1.15
DEMO_FRACTIONS ?= 0.9
DEMO_OUT := $(DEMO)/smollm2-w8a8
PYTEST_ARGS ?=

VENV_MIRROR ?= .venv-mirror
VENV_K8S ?= .venv-k8s

.PHONY: help setup setup-system setup-package setup-serve setup-mirror setup-node setup-k8s setup-bench k8s demo test test-fast lint bench clean

help:
	@echo "make demo       set up, then prune + quantize the bundled SmolLM2-135M-Instruct and serve it in vLLM"
	@echo "make test       set up, then run every test (unit, integration, vLLM)"
	@echo "make test-fast  unit tests only (no real model, no vLLM)"
	@echo "make bench      benchmarks -> docs/benchmarks.md"
	@echo "make lint       ruff + mypy"

setup: setup-system setup-package setup-serve

setup-system:
	@bash packaging/setup-system.sh

setup-package:
	@PYTHON=$(PYTHON) bash packaging/setup-env.sh package $(VENV)

setup-serve:
	@PYTHON=$(PYTHON) bash packaging/setup-env.sh serve $(VENV_SERVE)

# tests only: Grafana's published dashboard types, to type-check deploy/grafana/serve-pruned.json
setup-node:
	@[ -x deploy/grafana/schema-check/node_modules/.bin/tsc ] || \
	  npm ci --prefix deploy/grafana/schema-check --no-audit --no-fund --ignore-scripts --silent

# tests only: olah serves a Hugging Face mirror for the pull-through-a-mirror test
setup-mirror:
	@PYTHON=$(PYTHON) bash packaging/setup-env.sh mirror $(VENV_MIRROR)

# tests only: kubernetes-validate, checkov and helm-python-sdk validate the manifests, k8s/ and the Helm chart
setup-k8s:
	@PYTHON=$(PYTHON) bash packaging/setup-env.sh k8s $(VENV_K8S)

# Regenerate the committed Kustomize tree (tests/deploy/test_k8s.py diffs it against fresh output)
k8s: setup-package
	$(SP) deploy kustomize k8s

# The main job end to end on the bundled real model: materialize it, then package the strongest of
# $(DEMO_FRACTIONS) of its parameters + W8A8 whose held-out perplexity stays within $(DEMO_GUARD)x the original's
# (the quality guard; W8A8 alone when no cut does), each candidate pruned, recovered (refit + logit distillation
# from the original) and quantized (calibrated on Python's HOWTOs and FAQ plus text the original model writes
# itself); print the quality report of every stage (Python tutorial held out, a licence as out-of-domain text,
# fact prompts), check its perplexity through stock vLLM, then serve it as two co-located instances sized in bytes
# and show a completion from each.
demo: setup
	@set -euo pipefail; docs=$$(ls -d /usr/share/doc/python3*/html/_sources | head -n1); \
	$(SP) example-model $(DEMO)/SmolLM2-135M-Instruct --overwrite >/dev/null; \
	$(SP) package $(DEMO)/SmolLM2-135M-Instruct --out $(DEMO_OUT) --overwrite \
	  --max-ppl-ratio $(DEMO_GUARD) $(foreach f,$(DEMO_FRACTIONS),--guard-fractions $(f)) --quant w8a8 \
	  --calib $$docs/howto --calib $$docs/faq --calib generated:32 \
	  --eval-text $$docs/tutorial --eval-ood-text /usr/share/common-licenses/GPL-3 --eval-max-tokens 8192; \
	echo; echo "== perplexity through stock vLLM ($(VENV_SERVE)) =="; \
	$(SP) eval $(DEMO_OUT) --backend vllm --text $$docs/tutorial --max-tokens 8192; \
	echo; echo "== planned density =="; \
	$(SP) plan $(DEMO_OUT) --gpu H100-80GB --max-model-len 4096 --concurrency 16; \
	$(SP) plan $(DEMO_OUT) --gpu cpu --max-model-len 2048 --concurrency 16; \
	echo; echo "== two co-located instances, one completion each =="; \
	$(SP) serve $(DEMO_OUT) --instances 2 --port 8100 --metrics-port 9400 \
	  --prompt "The capital of France is"

test: setup setup-mirror setup-node setup-k8s
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

test-fast: setup-package
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup-package
	$(VENV)/bin/ruff check serve_pruned tests bench
	$(VENV)/bin/mypy

# benchmarks only: matplotlib and Torch-Pruning (its torch/numpy requirements are met by the packaging env's)
setup-bench: setup-package
	$(PY) -m pip install -q -e ".[bench]" -c packaging/constraints-package.txt

bench: setup setup-bench
	$(PY) bench/pipeline.py
	$(PY) bench/frontier.py
	$(PY) bench/scorers.py
	$(PY) bench/serving.py
	$(PY) bench/refit.py
	$(PY) bench/distill.py
	$(PY) bench/budget.py
	$(PY) bench/distill_speed.py
	$(PY) bench/exporter_scrape.py
	$(PY) bench/torch_pruning.py
	$(PY) bench/scale.py --depths 4,8,16,22 --scorer activation --samples 4 --serve
	$(PY) bench/obs_cost.py
	$(PY) bench/targets.py
	$(PY) bench/hidden.py
	$(PY) bench/guard.py

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache

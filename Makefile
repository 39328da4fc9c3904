VENV ?= .venv
export VENV
export RAY_USAGE_STATS_ENABLED ?= 0
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu

.PHONY: run test lint setup clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/saeforge train $(ARGS)

test: setup
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf store outputs

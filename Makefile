# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users set TORCH_SPEC (see README) or install torch themselves.
TORCH_SPEC ?= torch==2.13.0
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# pip warns about every package missing from the local mirror; keep real errors visible.
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test evaluate pretrain-demo clean-outputs

$(BIN)/.installed: pyproject.toml constraints.txt
	@echo "== creating $(VENV) (torch first, then anysat with its pinned dependencies)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(PIP_QUIET)
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(PIP_QUIET)
	$(BIN)/pip install -q -c constraints.txt -e ".[flows,dev]" $(PIP_QUIET)
	$(BIN)/python -c "import anysat, flows.embed_region, torch; print('anysat', anysat.__version__, 'torch', torch.__version__)"
	@touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m flows.embed_region --demo

test: install
	$(BIN)/python -m pytest -q tests

# The probe table of the shipped checkpoint (outputs/evaluation.md, outputs/evaluation.json).
evaluate: install
	$(BIN)/anysat evaluate

# Reproduces catalogs/checkpoints/demo (the checkpoint that ships) from the repository's data.
pretrain-demo: install
	$(BIN)/python -m anysat.train.demo_checkpoint --out catalogs/checkpoints/demo

clean-outputs:
	rm -rf outputs

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

# Reproduces catalogs/checkpoints/demo (the checkpoint that ships) from the repository's data,
# through the real path: chips by `anysat ingest`, then `anysat pretrain` on 2 processes.
# Interrupted, it resumes: run it again. It resumes only outputs made from the same code and
# data (their fingerprint in $(PRETRAIN_DEMO)/source); others are cleared first, since ingest
# skips complete chips and pretrain continues its latest checkpoint, and a checkpoint trained
# on chips of an older ingest is not what this code makes.
PRETRAIN_DEMO := outputs/pretrain-demo
PRETRAIN_SOURCES := anysat catalogs/modalities catalogs/demo catalogs/pretrain Makefile
pretrain-demo: install
	@source=$$(find $(PRETRAIN_SOURCES) -type f ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16); \
	if [ "$$(cat $(PRETRAIN_DEMO)/source 2>/dev/null)" != "$$source" ]; then \
	    echo "== $(PRETRAIN_DEMO): none from this code and data ($$source), starting afresh"; \
	    rm -rf $(PRETRAIN_DEMO) && mkdir -p $(PRETRAIN_DEMO) && echo "$$source" > $(PRETRAIN_DEMO)/source; \
	else echo "== $(PRETRAIN_DEMO): resuming ($$source)"; fi
	$(BIN)/anysat ingest --demo --chip-size-m 240 --store $(PRETRAIN_DEMO)/chips/demo.zarr
	$(BIN)/anysat ingest --catalog catalogs/pretrain/bigearthnet/catalog.json \
	    --geojson catalogs/pretrain/bigearthnet/footprints.geojson --start 2017-06-01 \
	    --end 2018-02-28 --sensors s2,s1 --chip-size-m 240 --store $(PRETRAIN_DEMO)/chips/bigearthnet.zarr
	$(BIN)/anysat pretrain --chips $(PRETRAIN_DEMO)/chips/demo.zarr,$(PRETRAIN_DEMO)/chips/bigearthnet.zarr \
	    --out $(PRETRAIN_DEMO)/run --nproc 2 --threads 1 --workers 1 --sensors s2,s1,dem \
	    --model tiny --dim 192 --depth 2 --steps 1500 --batch-size 4 --lr 1e-4 --sensor-drop 0 \
	    --log-every 50 --monitor-every 250 --checkpoint-every 250 --save-dtype float16
	rm -rf catalogs/checkpoints/demo && cp -r $(PRETRAIN_DEMO)/run/model catalogs/checkpoints/demo

clean-outputs:
	rm -rf outputs

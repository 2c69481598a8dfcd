# make demo: sample scenes -> the job with the trained demo model -> summary and overlays
# make test: the whole test suite (what CI runs)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
DEMO := demo-output

.PHONY: venv demo test bench bench-quick bench-many clean

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@rm -rf $(DEMO)
	$(BIN)/hrnet-beam scenes --demo --output $(DEMO)/images
	$(BIN)/hrnet-beam run --input '$(DEMO)/images/*' --model models/demo \
	  --output $(DEMO)/out/segmentations --tile_size 512 --tile_overlap 64
	$(BIN)/hrnet-beam show $(DEMO)/out/segmentations
	$(BIN)/hrnet-beam render $(DEMO)/out/segmentations --out $(DEMO)/out/overlays

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The full benchmark (HRNetV2-W48; tens of minutes on 2 cores) and its CI smoke version.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --report bench-report.json

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick --report bench-report-quick.json

# 20,000 small files and a 20,000-record shard through the local runner (a few minutes).
bench-many: $(STAMP)
	$(BIN)/python -m benchmarks.many_files --report bench-report-many.json

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache

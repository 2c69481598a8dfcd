# make demo: sample images -> stand-in model -> the job on the local runner -> summary
# make test: the whole test suite (what CI runs)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
DEMO := demo-output

.PHONY: venv demo test clean

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@rm -rf $(DEMO)/out
	$(BIN)/python -m pipeline.make_samples --output $(DEMO)/images
	@test -f $(DEMO)/model/saved_model.pb || \
	  $(BIN)/python -m pipeline.export_model --width 16 --depth reduced --output $(DEMO)/model
	$(BIN)/python -m pipeline --input '$(DEMO)/images/*' --model $(DEMO)/model \
	  --output $(DEMO)/out/segmentations
	$(BIN)/python -m pipeline.show $(DEMO)/out/segmentations

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache

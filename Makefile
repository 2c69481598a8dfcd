# make demo: sample scenes -> the job with the trained demo model -> summary and overlays
# make test: the whole test suite (what CI runs)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# datumaro (CVAT's dataset library; the tests import CVAT exports with it) pins
# cachetools~=7, which apache-beam[gcp] excludes: it gets a virtualenv of its own.
DATUMARO := .venv-datumaro
DATUMARO_PIN := datumaro==1.13.12
DATUMARO_STAMP := $(DATUMARO)/.installed-$(DATUMARO_PIN)
DEMO := demo-output

.PHONY: venv browser demo test docs bench bench-quick bench-many bench-launch bench-index bench-host clean

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

$(DATUMARO_STAMP):
	@test -x $(DATUMARO)/bin/python || $(PYTHON) -m venv $(DATUMARO)
	$(DATUMARO)/bin/python -m pip install --quiet --upgrade pip
	$(DATUMARO)/bin/python -m pip install --quiet '$(DATUMARO_PIN)'
	@rm -f $(DATUMARO)/.installed-*
	@touch '$(DATUMARO_STAMP)'

venv: $(STAMP) $(DATUMARO_STAMP)

demo: $(STAMP)
	@rm -rf $(DEMO)
	$(BIN)/hrnet-beam scenes --demo --output $(DEMO)/images
	$(BIN)/hrnet-beam run --input '$(DEMO)/images/*' --model models/demo \
	  --output $(DEMO)/out/segmentations --tile_size 512 --tile_overlap 64 \
	  --polygons_output $(DEMO)/out/polygons --min_polygon_area 16 --simplify_tolerance 1 \
	  --patch_output $(DEMO)/out/patches --patch_size 256
	$(BIN)/hrnet-beam show $(DEMO)/out/segmentations
	$(BIN)/hrnet-beam render $(DEMO)/out/segmentations --out $(DEMO)/out/overlays
	$(BIN)/hrnet-beam export --format coco $(DEMO)/out/segmentations --to $(DEMO)/out/coco
	$(BIN)/hrnet-beam index $(DEMO)/out/patches --level patch --to $(DEMO)/out/index
	$(BIN)/hrnet-beam search $(DEMO)/out/index --id $(DEMO)/images/2_park.png --patch 2,3 --k 5

# The web page's test drives Debian's headless Chromium through its ChromeDriver.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "make test needs Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; exit 1; fi; }

test: $(STAMP) $(DATUMARO_STAMP) browser
	HRNET_BEAM_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests

# The manual: reference pages regenerated from the code, then the site, strict, in site/.
docs: $(STAMP)
	$(BIN)/python -m pipeline.cli.reference
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The full benchmark (HRNetV2-W48; tens of minutes on 2 cores) and its CI smoke version.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --report bench-report.json

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick --report bench-report-quick.json

# 20,000 small files and a 20,000-record shard through the local runner (a few minutes).
bench-many: $(STAMP)
	$(BIN)/python -m benchmarks.many_files --report bench-report-many.json

# Launch at 10,000 / 100,000 / 1,000,000 local files and 100,000 objects in fake-gcs-server,
# and --skip_existing over 1,000,000 existing rows (about ten minutes; a few GB of disk).
bench-launch: $(STAMP)
	$(BIN)/python -m benchmarks.launch_scale --report bench-report-launch.json

# The host side of a worker with the model's cost taken out (a few minutes).
bench-host: $(STAMP)
	$(BIN)/python -m benchmarks.host_ceiling --report bench-report-host.json

# One million synthetic 720-d vectors indexed under a 4 GB budget (about ten minutes).
bench-index: $(STAMP)
	$(BIN)/python -m benchmarks.index_scale --report bench-report-index.json

clean:
	rm -rf $(VENV) $(DATUMARO) $(DEMO) site *.egg-info .pytest_cache

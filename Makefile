# rooftop-pv: `make all` runs the pipeline on the sample, `make test` runs the tests.
# Targets are real files, so an unchanged input rebuilds nothing.
SHELL := /bin/bash
.DEFAULT_GOAL := all
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/shanghai.yaml
SAMPLE_DIR ?= ../shared/data/shanghai
SCHEDULER ?=
RAW := data/raw
PROC := data/processed
OUT := outputs
EPW := $(RAW)/weather/CHN_Shanghai.Shanghai.583670_IWEC.epw
SAMPLE_STAMP := $(RAW)/shanghai/.complete
RUN = $(PY) -m pipeline run --config $(CONFIG) $(if $(SCHEDULER),--scheduler $(SCHEDULER))
# new building files in the drop folder (and the folder, whose mtime changes when one is removed)
DROP_FILES = $(wildcard $(RAW)/drop $(RAW)/drop/*)
COMMON := pipeline/config.py pipeline/parallel.py pipeline/io.py pipeline/glossary.py \
	pipeline/stream.py pipeline/columns.py pipeline/incremental.py $(CONFIG)
# system packages (Debian): root runs apt-get directly, others through sudo; never prompts
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get -q -y \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
QGIS_PY ?= /usr/bin/python3
REPORT_OUT := $(OUT)/rooftop_pv.gpkg $(OUT)/report.md $(OUT)/report.html $(OUT)/rooftop_pv.xlsx
REPORT_PY := pipeline/report.py pipeline/deliverables.py pipeline/targets.py pipeline/styles.py \
	pipeline/html_report.py pipeline/workbook.py pipeline/provenance.py pipeline/footprints.py

.PHONY: all install data fonts ingest classify roof shading yield report test lint qgis-check \
	clean distclean

all: $(REPORT_OUT)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# ---- data: the real sample (copied from SAMPLE_DIR) and the IWEC weather file (from PyPI)
data: $(SAMPLE_STAMP) $(EPW)

$(SAMPLE_STAMP): $(shell find $(SAMPLE_DIR) -type f 2>/dev/null) | $(VENV)/.installed
	$(PY) -m pipeline.data copy-sample --src $(SAMPLE_DIR) --dest $(RAW)/shanghai
	touch $@

$(EPW): | $(VENV)/.installed
	$(PY) -m pipeline.data fetch-epw --out $@

# ---- the CJK font of the charts (Chinese district names): Debian fonts-wqy-microhei
fonts: $(CJK_FONT)
$(CJK_FONT):
	$(APT) update
	$(APT) install --no-install-recommends fonts-wqy-microhei
	test -f $@

# ---- stages: GeoParquet between stages, GeoPackage at the end
ingest: $(PROC)/ingest_buildings.parquet
$(PROC)/ingest_buildings.parquet $(PROC)/ingest_areas.parquet $(PROC)/ingest_pois.parquet \
$(PROC)/ingest_rejected.parquet $(PROC)/ingest_accounting.json &: \
		$(SAMPLE_STAMP) $(DROP_FILES) pipeline/ingest.py pipeline/attributes.py \
		pipeline/coords.py pipeline/dedup.py $(COMMON)
	$(RUN) --stage ingest

classify: $(PROC)/classify_buildings.parquet
$(PROC)/classify_buildings.parquet $(PROC)/classify_evaluation.md &: \
		$(PROC)/ingest_buildings.parquet pipeline/classify.py pipeline/classify_eval.py \
		configs/classification.yaml configs/labels/cbdc_prototypes.csv $(COMMON)
	$(RUN) --stage classify

roof: $(PROC)/roof_buildings.parquet
$(PROC)/roof_buildings.parquet: $(PROC)/classify_buildings.parquet pipeline/roof.py \
		pipeline/heights.py pipeline/footprints.py pipeline/changes.py $(SAMPLE_STAMP) $(COMMON)
	$(RUN) --stage roof

shading: $(PROC)/shading_buildings.parquet
$(PROC)/shading_buildings.parquet: $(PROC)/roof_buildings.parquet $(EPW) pipeline/shading.py \
		pipeline/pvyield.py pipeline/weather.py $(COMMON)
	$(RUN) --stage shading

yield: $(PROC)/yield_buildings.parquet
$(PROC)/yield_buildings.parquet $(PROC)/yield_classes.csv &: $(PROC)/shading_buildings.parquet \
		$(EPW) pipeline/pvyield.py pipeline/planes.py pipeline/weather.py $(COMMON)
	$(RUN) --stage yield

report: $(REPORT_OUT)
$(REPORT_OUT) &: $(PROC)/yield_buildings.parquet $(PROC)/yield_classes.csv \
		$(PROC)/ingest_rejected.parquet $(REPORT_PY) pipeline/roof_report.py \
		pipeline/changes.py $(COMMON) | $(CJK_FONT)
	$(RUN) --stage report

# ---- the GeoPackage in the real client: PyQGIS (Debian python3-qgis, system python3), headless
qgis-check: $(OUT)/rooftop_pv.gpkg
	@if ! $(QGIS_PY) -c "import qgis.core" 2>/dev/null; then \
		echo "installing python3-qgis (Debian)"; \
		$(APT) update && $(APT) install --no-install-recommends python3-qgis; fi
	QT_QPA_PLATFORM=offscreen $(QGIS_PY) -m pipeline.qgis_check $< --png $(OUT)/qgis_check.png

# ---- checks
lint: $(VENV)/.installed
	$(PY) -m ruff check pipeline tests $(wildcard bench)

test: $(VENV)/.installed data lint | $(CJK_FONT)
	$(PY) -m pytest

clean:
	rm -rf $(PROC)/* $(OUT)/*
	touch $(PROC)/.gitkeep $(OUT)/.gitkeep

distclean: clean
	rm -rf $(RAW)/shanghai $(RAW)/weather $(VENV)

# ---- benchmark (prints numbers; generated data under data/bench/, gitignored)
BENCH_SIZES ?= 250000 1000000 2000000
BENCH_REPEAT ?= 2
.PHONY: bench
bench: $(VENV)/.installed data
	PYTHONPATH=$(CURDIR) $(PY) -m bench.run --sizes $(BENCH_SIZES) --repeat $(BENCH_REPEAT)

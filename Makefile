# Every target builds .venv from this repository's own files; torch is pinned by constraints.txt
# (an unpinned torch pulls a CUDA build of several GB).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,experiments]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/normsurgeon demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_fold.py --runs 300

clean:
	rm -rf $(VENV) *.egg-info

# The two commands: `make demo` (the whole pipeline on generated data) and `make test`.
PYTHON ?= python3
DATA ?= data/demo
OUT ?= runs/demo

.PHONY: install test test-fast demo demo-data clean

install:
	$(PYTHON) -m pip install -q -r requirements.txt

test: install
	$(PYTHON) -m pytest -q tests

# unit tests and one tiny end-to-end pipeline (tests marked slow left out)
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

$(DATA)/train.csv:
	$(PYTHON) -m utils.demo_data --out $(DATA)

demo-data: $(DATA)/train.csv

demo: install
	$(PYTHON) -m utils.demo --data-dir $(DATA) --out-dir $(OUT)

clean:
	rm -rf $(OUT)

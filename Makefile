# Two entry points for a newcomer: `make test` and `make demo`. Both create .venv
# and install the project (with torch pinned by constraints.txt) on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint format test rehearsal demo report clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

CODE := pipelines cmd_model jobs benchmarks tests

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

format: $(STAMP)  # rewrites the code as `make lint` wants it (ruff format, 120 columns)
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

# Two xdist workers, a test file each (tests/conftest.py and docs/testing.md say why); PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 -m "not rehearsal" tests

# The shipped manifests' jobs on a 3-node cluster that starts empty (tests/cluster_rehearsal.py):
# about 6 minutes of ray job submit, so apart from `make test`; CI runs both.
rehearsal: $(STAMP)
	$(BIN)/python -m pytest -q -s -m rehearsal tests/test_cluster_rehearsal.py

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

report: $(STAMP)
	@for p in tiny ucf101-64 webvid-sd15-512 webvid-sd21-512x1024; do $(BIN)/python -m cmd_model.report --preset $$p --json; done

clean:
	rm -rf $(VENV) demo_out .pytest_cache

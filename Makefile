# Two entry points for a newcomer: `make demo` and `make test`. Each sets up .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. Override for a CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
TORCH_PIN ?= $(word 1,$(TORCH_SPEC))
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-lora test test-fast browser lint docs clean constraints

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	echo "$(TORCH_PIN)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/pipeline run transfer --demo

demo-lora: setup
	$(VENV)/bin/pipeline run lora --demo

# Headless Chromium for the report's browser test (Debian's package). Installed when this user may (root with
# apt-get); elsewhere the test is skipped with its reason and `sudo make browser` installs it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the report's browser test ..."; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "could not install chromium: the report's browser test will be skipped"; \
	else echo "no chromium: the report's browser test will be skipped (sudo make browser installs it)"; fi

# After upgrading packages in .venv and passing `make test`: record them as the versions setup installs.
constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch==|#|-e )'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

test: setup browser
	$(PY) -m pytest -q --durations=10 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q --durations=10 -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

docs: setup
	$(PY) -m pipeline.schema_docs > docs/config.md

clean:
	rm -rf $(VENV) pipeline-demo .pytest_cache

# `make demo` and `make test` each work from a fresh clone: they create .venv if it is missing.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow install clean

# On machines whose pip is capped (/etc/xdg/pip) torch 2.14.1 / torchvision 0.29.1 lie on local disk:
# take exactly that pair there; elsewhere torch stays an ordinary dependency.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	if [ -d /etc/xdg/pip ]; then $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1; fi
	$(PY) -m pip install -q -e ".[test,inception]"
	touch $(STAMP)

install: $(STAMP)

# `make test`: every test but the slow ones, two workers: minutes.
# `make test-slow`: tests that launch torchrun / gloo ranks or run README.md's blocks in fresh interpreters.
# CI (.ci/run) runs both.
test: $(STAMP)
	$(VENV)/bin/ruff check fastdiff tests pipelines eval
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -m slow

demo: $(STAMP)
	$(VENV)/bin/fastdiff demo

clean:
	rm -rf $(VENV) build *.egg-info

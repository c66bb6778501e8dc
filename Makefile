# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-unit test-service lint up torchcodec-env
# `make` alone installs; the command is then .venv/bin/videoqa.
.DEFAULT_GOAL := install

$(BIN)/python:
	@echo "==> [1/3] creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The CPU build of torch goes in first, so the range in pyproject is already satisfied and no
# multi-GB CUDA build is pulled in. torchvision is never installed on CPU machines.
# pip runs without -q so its downloads show; the stamp skips it until pyproject.toml changes.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "==> [2/3] torch, CPU build (about 200 MB)"
	$(BIN)/pip install --progress-bar on "torch==2.13.0"
	@echo "==> [3/3] videoqa with its workers and test extras"
	$(BIN)/pip install --progress-bar on -e ".[test]"
	@touch $@
	@echo "==> installed: run $(BIN)/videoqa (try: $(BIN)/videoqa up --tiny)"

demo: install
	$(BIN)/videoqa demo

up: install
	$(BIN)/videoqa up

# The whole suite: unit and service tests (Redis must answer on 127.0.0.1:6379; .ci/run starts one).
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

# Tests in the test process only: no Redis, no S3 server, no child process but the code checkers.
test-unit: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -m unit

# Tests with real processes: Redis, moto's S3 server, gunicorn, Celery workers.
test-service: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -m service

# The linter, the formatter's check and the type checker, as tests/test_code_checks.py runs them.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# torchcodec's PyPI wheel needs a CUDA build of torch and FFmpeg's shared libraries (FFmpeg 5 from
# Debian 12 here); bench.frames runs it from this separate environment
# (VIDEOQA_BENCH_TORCHCODEC_PYTHON=$(TORCHCODEC_VENV)/bin/python). It decodes on the CPU.
TORCHCODEC_VENV ?= $(HOME)/.cache/videoqa/torchcodec-venv
torchcodec-env:
	apt-get install -y -q libavcodec59 libavformat59 libavutil57 libswscale6 libavdevice59 libavfilter8 libswresample4
	$(PYTHON) -m venv $(TORCHCODEC_VENV)
	$(TORCHCODEC_VENV)/bin/pip install -q "torch==2.14.1" "torchcodec==0.17.0" "numpy==2.4.6"

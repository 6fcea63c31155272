# The checks CI runs (.ci/run), in pieces for a developer.
PY ?= .venv/bin/python

.PHONY: setup check test test-fast bench-gpu

setup:          ## the virtual environment, the package and its dev tools, the CUDA compile check's toolchain
	python3 -m venv .venv && .venv/bin/pip install -e ".[cpu,dev]" && $(PY) -m zmlx.kernels.cuda_setup

check:          ## lint, format and type checks (no tests)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test:           ## every test CI runs, skips listed, a missing g++ or NVRTC is a failure
	$(PY) -m pytest -q -rs --require-toolchains

test-fast:      ## the tests that start no Python processes
	$(PY) -m pytest -q -rs -m "not slow"

bench-gpu:      ## on the GPU machine (benchmarks/README.md): TOKENS=200 STEP=ledger
	bash benchmarks/gpu/run_glm47_flash.sh $${STEP:-ledger} $${TOKENS:-200}

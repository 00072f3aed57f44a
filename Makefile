# The two commands of the README: `make lab` (the built-in experiments) and `make test` (lint + tests).
# Each creates and fills .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flexbn-installed

.PHONY: lab test lint format bench clean sanitize

$(STAMP): requirements-dev.txt pyproject.toml setup.py src/flexbn/_core/kernels.cpp  # kernels built in place
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/flexbn lab

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

# The kernel tests on kernels built with AddressSanitizer and UndefinedBehaviorSanitizer (docs/kernels.md):
# FLEXBN_BUILD_FLAGS makes flexbn build them at run time (cached beside the normal build), and libasan
# and libstdc++ are preloaded since Python itself is not instrumented.
CXX ?= g++
SANITIZE := FLEXBN_BUILD_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g" \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 FLEXBN_BACKEND=cpp

sanitize: $(STAMP)
	$(SANITIZE) $(BIN)/python -c "import flexbn; i = flexbn.backend_info(); print(i); assert 'FLEXBN_BUILD_FLAGS' in i['reason'] and i['cpu'] == 'cpp'"
	$(SANITIZE) $(BIN)/python -m pytest -q -p no:cacheprovider --capture=sys tests/test_kernel_thresholds.py \
		tests/test_native.py -k "thresholds or call or c_side or mask_bytes or error_codes"
	$(SANITIZE) $(BIN)/python -m pytest -q -p no:cacheprovider --capture=sys -k "cpp and not compiled" \
		tests/test_segments.py tests/test_mask_stats_input.py tests/test_gradients.py tests/test_numerics.py \
		tests/test_renorm.py tests/test_modules.py tests/test_backend.py

bench: $(STAMP)
	$(BIN)/flexbn bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis src/*.egg-info build src/flexbn/_core/_kernels-*.so

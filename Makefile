# The two entry points: `make demo` (the main job) and `make test`. Both set everything up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEBS   := qemu-system-x86 qemu-system-arm busybox-static dwarves gdb

.PHONY: demo test bench system venv clean

demo: system venv
	$(BIN)/vmwatch demo

test: system venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: system venv
	$(BIN)/pip install -q -e '.[bench]'
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

# Debian packages: installed when missing and running as root, otherwise named.
system:
	@missing=""; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v qemu-system-aarch64 >/dev/null || missing="$$missing qemu-system-arm"; \
	test -x /bin/busybox -a -n "$$(file -L /bin/busybox 2>/dev/null | grep -i static)" || dpkg -s busybox-static >/dev/null 2>&1 || missing="$$missing busybox-static"; \
	command -v pahole >/dev/null || missing="$$missing dwarves"; \
	command -v gdb >/dev/null || missing="$$missing gdb"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "vmwatch needs the Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 2; fi; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,chart,volatility]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

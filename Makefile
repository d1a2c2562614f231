# The two entry points: `make demo` (the main job) and `make test`. Both set everything up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEBS   := qemu-system-x86 qemu-system-arm busybox-static dwarves gdb gdb-multiarch postgresql
# apt's own per-file retries and a bound on a stalled mirror. `apt-get update` and the install are
# each tried three times; the install is tried even after a partial update (it may have the lists it
# needs). The lab's kernel and busybox come later, from vmwatch/lab (the same code as `vmwatch lab start`).
APT_OPTS := -o Acquire::Retries=5 -o Acquire::http::Timeout=30 -o Acquire::https::Timeout=30

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
	command -v gdb-multiarch >/dev/null || missing="$$missing gdb-multiarch"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    for wait in 5 15 0; do apt-get $(APT_OPTS) update -qq && break; \
	      [ $$wait = 0 ] || { echo "apt-get update failed; again in $$wait s"; sleep $$wait; }; done; \
	    for wait in 5 15 0; do DEBIAN_FRONTEND=noninteractive apt-get $(APT_OPTS) install -y -qq \
	        --no-install-recommends $$missing && break; \
	      [ $$wait = 0 ] && { echo "vmwatch needs the Debian packages:$$missing (apt-get install failed;" \
	        "try again when the mirror answers)"; exit 2; }; \
	      echo "apt-get install failed; again in $$wait s"; sleep $$wait; done; \
	  else echo "vmwatch needs the Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 2; fi; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,chart,volatility,postgres]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# The two commands of the README: `make demo` and `make test`. Both set up .venv first
# (again only when pyproject.toml or the setup script changed).
.PHONY: setup demo test test-all lint

STAMP := .venv/.setup-stamp

$(STAMP): pyproject.toml .ci/setup
	bash .ci/setup
	touch $(STAMP)

setup: $(STAMP)

# The demo is a shell script of the commands a user types, with the venv's `loraplex` on PATH.
demo: $(STAMP)
	PATH="$(CURDIR)/.venv/bin:$$PATH" bash examples/demo.sh

# pytest exits 5 when it collected nothing: for us that is a failure, said plainly.
test: $(STAMP)
	@.venv/bin/python -m pytest -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected: that is a failure"; exit 1; fi; exit $$rc

test-all: $(STAMP)
	.venv/bin/python -m pytest

lint: $(STAMP)
	.venv/bin/ruff check server trainer adapters tests benchmarks

# The two commands: `make run` (set up and start the whole stack) and `make test`.
.PHONY: run test setup lint build bench clean

setup:
	bash scripts/setup.sh

run: setup
	bash scripts/run.sh

test:
	bash scripts/setup.sh --test
	@.venv/bin/pytest -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc = 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$rc

lint:
	.venv/bin/ruff check .

build:
	.venv/bin/mailgenius build

clean:
	rm -rf var .pytest_cache

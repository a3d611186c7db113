# The two commands a newcomer runs; both set up .venv first (idempotent).
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/cpu_quickstart.py

test: setup lint
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check .

# The two commands a newcomer runs; both set up .venv first (idempotent).
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	bash examples/cpu/train_tiny.sh
	.venv/bin/python tools/generate_demo.py --load runs/tiny

test: setup lint
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check .

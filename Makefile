# Shortcuts for the README's commands.
.PHONY: setup run test lint
setup:
	bash launch/setup.sh
run: setup
	.venv/bin/python -m toolrl.main
test: setup
	.venv/bin/python -m pytest
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

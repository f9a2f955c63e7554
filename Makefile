# The two commands of the README. Each sets up a fresh machine first (idempotent).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/advpure demo

test: setup
	bash scripts/test.sh

PYTHON ?= .venv/bin/python

# Step time of every variant side by side (RoBERTa-base shape, then MiniLM), one module alone, then the controller overhead.
bench:
	$(PYTHON) benchmarks/step_time.py --model roberta-base-shape --steps 16 --warmup 2
	$(PYTHON) benchmarks/step_time.py --model minilm --steps 40 --warmup 3
	$(PYTHON) benchmarks/module_step.py
	$(PYTHON) benchmarks/controller_overhead.py --model minilm

# Peak RSS of every variant, each in its own process.
bench-memory:
	$(PYTHON) benchmarks/step_time.py --model roberta-base-shape --memory --steps 2 --warmup 1
	$(PYTHON) benchmarks/step_time.py --model minilm --memory --steps 3 --warmup 1

.PHONY: bench bench-memory

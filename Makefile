# Two commands a user needs: `make train` and `make test`. Both set up .venv by themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export WANDB_MODE ?= offline
# DeepSpeed JIT-compiles its CPU ops (cpu_adam for ZeRO-Offload, the shared-memory allreduce) on first use: keep
# them with this checkout's venv, so another checkout's build does not make this one compile again.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup train finetune test test-fast compile-check lint clean

setup: $(VENV)/.installed

# torch first (keeps the local CPU build, or the cluster's CUDA build); DeepSpeed is source-only and
# must build against that torch, so no build isolation and no JIT ops at install time.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q einops hjson msgpack ninja numpy packaging psutil py-cpuinfo "pydantic>=2" tqdm
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	$(PIP) install -q -e ".[dev]"
	touch $@

train: setup
	$(PY) -m trainer.pretrain $(ARGS)

# Fine-tune the model `make train` pretrained (pretraining it first if runs/tiny has no checkpoint yet) on an
# offline task from the standard library, and print before/after figures; ARGS go to trainer.finetune.
finetune: setup
	@ls runs/tiny/checkpoints/step_*/trainer_state.json >/dev/null 2>&1 || \
		{ echo "no pretrained model in runs/tiny yet: running make train first"; $(MAKE) train ARGS=; }
	$(PY) -m trainer.finetune_demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed" $(ARGS)

# Compile every Triton kernel for sm_80 and sm_90a (no GPU needed; cached, so a rerun compiles only what
# changed): writes docs/kernel_resources.md and kernels/compiled_resources.json, the table the autotuners prune
# spilling tiles with; fails when a config they may pick spills, overflows shared memory or lacks tensor cores.
compile-check: setup
	$(PY) -m kernels.benchmarks.resources --quiet $(ARGS)

lint: setup
	$(VENV)/bin/ruff check trainer kernels data_pipeline launch tests

clean:
	rm -rf $(VENV) outputs runs data/prepared

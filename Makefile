# Every target sets up .venv on first use (a fast no-op afterwards) and launches one module.
# RUN=<name> picks the run (runs/<name>/), NPROC=<n> the processes, ACCEL=<file in
# configs/accelerate> the launcher, ARGS="key=value ..." per-stage overrides, FROM=<stage> restarts,
# STAGES=<a,b,...> the stages `make pipeline` runs (default the InstructGPT chain pretrain,sft,rm,ppo),
# `make study` runs the pipeline over 3 world seeds x 2 training seeds (ARGS="--seeds 0 key=value ..."),
# `make overopt` runs PPO from RUN's reward model over a sweep of KL coefficients (ARGS="--betas 0.1,0.01"),
# `make rm-curve` trains RUN's reward model on fewer comparisons: its learning curve (ARGS="--sizes 50,1000"),
# STAGE=<stage> whose model `make chat` talks to (ARGS="--temperature 0.7" there) or `make plan` plans
# (NPROC, ACCEL and GPU_MEM=<GiB> there: the GPUs to plan for, default 8 under fsdp with 80 GiB).
PY      := .venv/bin/python
SETUP   := python3 -m pipeline.bootstrap
RUN     ?= default
ARGS    ?=
FROM    ?=
STAGE   ?= ppo
STAGES  ?=
# every stage of pipeline/registry.py is a target (`make dpo`); the registry imports nothing
STAGE_TARGETS := $(shell python3 -c "import pipeline.registry as r; print(*r.NAMES)" 2>/dev/null || echo pretrain sft rm ppo)

.PHONY: setup $(STAGE_TARGETS) pipeline study overopt rm-curve plan status chat test test-all bench bench-ppo gpu-smoke clean

setup:
	@$(SETUP)

$(STAGE_TARGETS): setup
	$(PY) -m pipeline.launch $@ run_name=$(RUN) $(ARGS)

pipeline: setup
	$(PY) -m pipeline run --run $(RUN) $(if $(FROM),--from $(FROM)) $(if $(STAGES),--stages $(STAGES)) $(ARGS)

study: setup
	$(PY) -m pipeline study $(ARGS)

overopt: setup
	$(PY) -m pipeline overopt --run $(RUN) $(ARGS)

rm-curve: setup
	$(PY) -m pipeline rm-curve --run $(RUN) $(ARGS)

plan: setup
	$(PY) -m pipeline plan $(STAGE) run_name=$(RUN) $(ARGS) --launcher $(or $(ACCEL),fsdp) --nproc $(or $(NPROC),8) $(if $(GPU_MEM),--gpu-mem $(GPU_MEM))

status: setup
	$(PY) -m pipeline status $(RUN)

chat: setup
	$(PY) -m pipeline chat $(RUN) --stage $(STAGE) $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pipeline.bench $(ARGS)

bench-ppo: setup
	$(PY) -m pipeline.bench ppo $(ARGS)

gpu-smoke: setup
	$(PY) -m pipeline.gpu_smoke

clean:
	rm -rf runs wandb

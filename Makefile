# Two commands do all the set-up: `make demo` and `make test`. Every target builds .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2
# The unit tier runs on this many pytest-xdist workers, one test module each at a time (its fixtures are built once).
TEST_WORKERS ?= 2
UNIT := -m "not slow and not distributed" -n $(TEST_WORKERS) --dist loadscope
export OMP_NUM_THREADS ?= 1

.PHONY: venv test-servers test test-fast lint typecheck demo paper smoke-data clean

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

data/smoke/manifest.json: | venv
	$(PY) -m shards synthetic --out data/smoke --classes 10 --train 200 --val 50 --test 50 --size 64 --shard-size 60

smoke-data: data/smoke/manifest.json

# The storage tests serve shards from a real nginx on loopback (tests/servers.py): Debian's nginx-light, installed
# here when missing and possible (root with apt-get); otherwise those tests skip, saying why.
test-servers:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light \
		>/dev/null 2>&1)) || echo "nginx-light could not be installed: the HTTP storage tests will skip"; }

# Everything: the unit tier in parallel, then the end-to-end and multi-process tiers one test at a time, since
# those start their own processes (torchrun ranks, Slurm jobs) and time out if they fight for two cores.
test: venv test-servers
	$(PY) -m pytest -q $(UNIT)
	$(PY) -m pytest -q -m "slow or distributed"

# The unit tier: no torchrun, no Slurm, no multi-process training (the `distributed` and `slow` markers); 90 s on
# 2 cores with the extension cache warm (README, "Tests").
test-fast: venv test-servers
	$(PY) -m pytest -q $(UNIT)

lint: venv
	$(PY) -m ruff check .

typecheck: venv
	$(PY) -m mypy

# The demo is the paper in miniature: a trunk pretrained on single-object images (the ImageNet stand-in), then
# Full / AN / LL-R / LL-R+BoostLU fine-tuned from it on multi-object single-positive images, and AN's own
# checkpoint evaluated with BoostLU at inference only (configs/demo/, docs/results.md).
data/demo-pretrain/manifest.json: | venv
	$(PY) -m shards synthetic --out data/demo-pretrain --objects 1 --classes 20 --train 1500 --val 200 --test 200 \
		--size 72 --seed 1 --shard-size 250

data/demo/manifest.json: | venv
	$(PY) -m shards synthetic --out data/demo --classes 20 --train 640 --val 160 --test 400 --size 72 --shard-size 80

demo: venv data/demo/manifest.json data/demo-pretrain/manifest.json
	$(PY) -m bgtrain.reproduce --table demo --shards data/demo --pretrain data/demo-pretrain --nproc $(NPROC) \
		--out runs/demo
	$(PY) -m bgtrain.explain overlay --checkpoint runs/demo/LL-R_BoostLU/checkpoints/best.pt \
		--shards data/demo --split test --count 4 --classes top3 --out runs/demo/overlays

# make paper: the paper's five claims checked on the project's own experiment (docs/results.md, "make paper").
# A trunk pretrained once on single-object images (in seed 0's folder, shared by every seed like ImageNet weights),
# then per seed s its own multi-object data and head initialisation (seed=s): Full / AN / LL-R / LL-R+BoostLU
# fine-tuned 16 epochs, AN's checkpoint at alpha 5, and the explanation gap of AN and LL-R+BoostLU against Full;
# bgtrain.claims checks the claims over the seeds (claims.json) and writes report.html. About 35 min per seed on
# 2 cores. The size variables exist for the end-to-end test, which runs it tiny; the committed sizes are the result.
SEEDS ?= 1
PAPER_DATA ?= data/paper
PAPER_OUT ?= runs/paper
PAPER_SIZE ?= 72
PAPER_PRETRAIN ?= --train 3000 --val 300 --test 300
PAPER_FINETUNE ?= --train 2000 --val 300 --test 600
PAPER_ARGS ?=
PAPER_SEEDS = $(shell seq 0 $$(( $(SEEDS) - 1 )))

$(PAPER_DATA)/pretrain/manifest.json: | venv
	$(PY) -m shards synthetic --out $(PAPER_DATA)/pretrain --objects 1 --classes 20 $(PAPER_PRETRAIN) \
		--size $(PAPER_SIZE) --seed 101 --shard-size 250

$(PAPER_DATA)/seed%/manifest.json: | venv
	$(PY) -m shards synthetic --out $(PAPER_DATA)/seed$* --classes 20 $(PAPER_FINETUNE) --size $(PAPER_SIZE) \
		--seed $* --shard-size 250

paper: venv $(PAPER_DATA)/pretrain/manifest.json $(foreach s,$(PAPER_SEEDS),$(PAPER_DATA)/seed$(s)/manifest.json)
	set -e; for s in $(PAPER_SEEDS); do \
		out=$(PAPER_OUT)/seed$$s; data=$(PAPER_DATA)/seed$$s; \
		if [ $$s = 0 ]; then trunk="--pretrain $(PAPER_DATA)/pretrain"; \
		else trunk="model.pretrained=$(PAPER_OUT)/seed0/pretrain/trunk.pt"; fi; \
		$(PY) -m bgtrain.reproduce --table paper --shards $$data --nproc $(NPROC) --out $$out $$trunk seed=$$s \
			$(PAPER_ARGS); \
		for b in AN LL-R_BoostLU; do \
			$(PY) -m bgtrain.explain gap --a $$out/full/checkpoints/best.pt --b $$out/$$b/checkpoints/best.pt \
				--alpha-b 5 --shards $$data --split test --out $$out/gap/full_vs_$$b; \
		done; \
	done
	$(PY) -m bgtrain.claims $(PAPER_OUT)

clean:
	rm -rf runs data/smoke data/demo data/demo-pretrain data/paper

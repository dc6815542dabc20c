# Two commands do all the set-up: `make demo` and `make test`. Every target builds .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2
# The unit tier runs on this many pytest-xdist workers, one test module each at a time (its fixtures are built once).
TEST_WORKERS ?= 2
UNIT := -m "not slow and not distributed" -n $(TEST_WORKERS) --dist loadscope
export OMP_NUM_THREADS ?= 1

.PHONY: venv test-servers test test-fast lint typecheck demo smoke-data clean

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

clean:
	rm -rf runs data/smoke data/demo data/demo-pretrain

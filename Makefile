# Two entry points a newcomer needs: `make demo` and `make test`. Each creates .venv if it is missing.
# `make test-fast`: the tests that start no Ray, MLflow server or entry-point subprocess (seconds to a minute).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
DEMO_GROUP := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m alexnet.sample --output $(DEMO_DIR)/imagenet-sample --num-classes 10 --train-per-class 60 --val-per-class 12 --seed 0
	$(PY) pipelines/preprocess.py --input $(DEMO_DIR)/imagenet-sample --output $(DEMO_DIR)/prepared --size 72 --overwrite
	$(PY) pipelines/train.py --data $(DEMO_DIR)/prepared --num-workers 2 --width 0.25 --image-size 64 \
		--init pytorch --batch-size 32 --lr 0.005 --epochs 6 --eval-10crop-every 3 --storage-path $(DEMO_DIR)/ray_results \
		--seeds 5 --run-name $(DEMO_GROUP)
	$(PY) pipelines/evaluate.py --data $(DEMO_DIR)/prepared --experiment alexnet-ray \
		--filter "tags.ensemble_group = '$(DEMO_GROUP)'" --sizes 1 5 --crops both --register-model alexnet-demo-ensemble
	$(PY) pipelines/tune.py --data $(DEMO_DIR)/prepared --width 0.25 --image-size 64 --init pytorch \
		--batch-size 32 --epochs 3 --num-samples 3 --grace-period 1 --eval-10crop-every 0 \
		--storage-path $(DEMO_DIR)/ray_results

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not integration and not gpu"

bench: $(VENV)/.installed
	$(PY) bench/preprocess_speed.py
	$(PY) bench/train_speed.py --workdir bench/out
	$(PY) bench/input_speed.py --workdir bench/out
	$(PY) bench/model_speed.py

clean:
	rm -rf $(DEMO_DIR) mlflow.db mlartifacts mlruns ray_results

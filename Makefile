# The two commands of the README: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install:
	bash scripts/install.sh $(VENV)

# The demo trains into a fresh timestamped folder each time (an existing logdir would be
# resumed, i.e. a finished demo would do nothing), then draws predictions on 4 val images.
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_LOGDIR ?= train_log/shapes_demo-$(DEMO_STAMP)
DEMO_OUTPUT ?= predictions/$(notdir $(DEMO_LOGDIR))
SHAPES_CACHE_DIR ?= $(HOME)/.cache/rcnn_shapes
demo: install
	$(PY) train.py --config-file configs/shapes_demo.yaml --logdir $(DEMO_LOGDIR)
	$(PY) predict.py --load $(DEMO_LOGDIR) --config-file configs/shapes_demo.yaml \
		--predict '$(SHAPES_CACHE_DIR)/val_1_100_192-320_v*/0000[0-3].png' --output $(DEMO_OUTPUT)
	@echo "demo: checkpoint and logs in $(DEMO_LOGDIR), overlays in $(DEMO_OUTPUT)"

test: install
	$(PY) -m pytest tests -q -ra

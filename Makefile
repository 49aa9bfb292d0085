# Two commands do all set-up on a fresh machine:
#   make run    venv, install, migrate, tiny model when none is configured, a local token, web + worker
#   make test   venv, install, the whole suite on PostgreSQL (DATABASE_URL, default 127.0.0.1:5432/test)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
VAR_DIR := $(CURDIR)/var
TINY_MODEL_DIR := $(VAR_DIR)/tiny-model

# `make run` is the one-command local demo: DEBUG on, SQLite under var/ unless DATABASE_URL is set,
# and the tiny random Wan models (T2V, I2V, LoRAs) unless LIGHTX2V_MODEL_PATH names a real Wan2.1
# directory; then I2V and LoRAs are whatever LIGHTX2V_I2V_MODEL_PATH and LIGHTX2V_LORA_DIR say (no
# I2V model: image requests are a 400), never the tiny ones beside a real model.
ifeq ($(LIGHTX2V_MODEL_PATH),)
TINY_MODELS = LIGHTX2V_MODEL_PATH=$(TINY_MODEL_DIR)/t2v \
	LIGHTX2V_I2V_MODEL_PATH=$${LIGHTX2V_I2V_MODEL_PATH:-$(TINY_MODEL_DIR)/i2v} \
	LIGHTX2V_LORA_DIR=$${LIGHTX2V_LORA_DIR:-$(TINY_MODEL_DIR)/loras}
endif
RUN_ENV = DEBUG=$${DEBUG:-1} $(TINY_MODELS)

.PHONY: install run test migrate clean

$(VENV)/.installed: requirements/base.txt requirements/inference.txt requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

install: $(VENV)/.installed

migrate: install
	$(RUN_ENV) $(PY) manage.py migrate --noinput
	$(RUN_ENV) $(PY) manage.py createcachetable

run: migrate
	@if [ -z "$$LIGHTX2V_MODEL_PATH" ]; then $(RUN_ENV) $(PY) manage.py build_tiny_model $(TINY_MODEL_DIR); fi
	@echo "API token for user 'local' (send it as 'Authorization: Bearer <token>'):"
	@$(RUN_ENV) $(PY) manage.py create_api_token local --name "make run"
	@echo "Serving on http://127.0.0.1:$(PORT)/  (docs: /docs, admin: /admin/); Ctrl-C stops web and worker."
	@$(RUN_ENV) $(PY) manage.py qcluster & worker=$$!; \
	trap 'kill -TERM $$worker 2>/dev/null; wait $$worker' INT TERM EXIT; \
	$(RUN_ENV) $(PY) manage.py runserver 127.0.0.1:$(PORT) --noreload

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) var .pytest_cache

# The two Quickstart commands: `make start` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install start test

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

start: install
	@if [ -f "$${ENV_FILE:-.env}" ] || [ -n "$$ENDPOINT" ]; then \
		exec $(PY) server.py; \
	else \
		echo "No .env found: starting with the built-in Azure OpenAI emulator (synthetic answers)"; \
		echo "on port $${HTTP_PORT:-8080}. Copy sample.env to .env and fill it in to use Azure."; \
		HTTP_PORT=$${HTTP_PORT:-8080} exec $(PY) server.py --emulator; \
	fi

# PM2 for the reload test, as package-lock.json pins it.
node_modules/.bin/pm2: package.json package-lock.json
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund; \
	else echo "npm not found: the PM2 reload test will be skipped (apt-get install nodejs npm)"; fi

test: install node_modules/.bin/pm2
	$(PY) -m pytest

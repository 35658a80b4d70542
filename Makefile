# The two Quickstart commands: `make start` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# Playwright drives the system's chromium; it must never fetch a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
# What the tests need from Debian: Redis (the quota tests start their own),
# openssl (a throwaway certificate), Node.js and npm (PM2, for the reload test),
# python3-venv (the venv itself), chromium (the console tests drive it through
# Playwright, which never downloads a browser of its own).
DEBIAN_PACKAGES := redis-server openssl nodejs npm python3-venv chromium

.PHONY: install start test lint system-packages

# Installs what is missing when run as root; otherwise one line says what to run.
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "make test needs the Debian packages$$missing: run sudo apt-get install -y$$missing"; \
		exit 1; \
	fi; \
	echo "installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q $$missing

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
	npm ci --no-audit --no-fund

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: system-packages install node_modules/.bin/pm2 lint
	$(PY) -m pytest

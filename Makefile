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
# The command that succeeds when each of them is present.
present_redis-server := command -v redis-server
present_openssl := command -v openssl
present_nodejs := command -v node
present_npm := command -v npm
present_python3-venv := python3 -c 'import venv, ensurepip'
present_chromium := command -v chromium

.PHONY: install start test lint system-packages

# Installs what is missing when run as root; otherwise one line says what to run.
system-packages:
	@missing=""; \
	$(foreach package,$(DEBIAN_PACKAGES),\
		$(present_$(package)) >/dev/null 2>&1 || missing="$$missing $(package)";) \
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

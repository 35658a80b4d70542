// PM2 process file: `pm2 start ecosystem.config.js`, `pm2 reload azure-gpt-api`.
// Mirrors the original service's PM2 setup, with a Python interpreter.
//
// How a reload stays zero-downtime (tests/test_pm2.py checks it under load):
// a Python app runs in fork mode, where PM2 turns `reload` into a restart of
// one instance at a time (PM2 does at most one at a time for two instances,
// two at a time for more). It sends the instance SIGINT; the server stops
// listening, while the other instances, bound to the same port with
// SO_REUSEPORT, take every new connection; it lets its in-flight requests and
// streams finish (answering with `Connection: close`), then exits. PM2 then
// starts the replacement and moves on to the next instance only once that one
// has sent "ready" (wait_ready), i.e. once it listens. So run at least two
// instances: with one, a reload leaves the port closed for a moment.
const fs = require('fs');
const path = require('path');

const SECOND = 1000;

// kill_timeout must outlast the drain, or PM2 SIGKILLs streams still in flight.
// DRAIN_TIMEOUT is 30 s by default; if it is raised in this environment, follow it.
const drainSeconds = Number(process.env.DRAIN_TIMEOUT) || 30;

// Every instance writes its metric values here and any instance's /metrics
// shows the sum (prometheus-client's multiprocess mode). Files of instances a
// reload replaced stay, so counters keep counting across reloads.
const metricsDir = process.env.PROMETHEUS_MULTIPROC_DIR || path.join(__dirname, '.metrics');
fs.mkdirSync(metricsDir, { recursive: true });

module.exports = {
  apps: [
    {
      name: 'azure-gpt-api',
      cwd: __dirname,
      script: 'server.py',
      // The project's venv (made by `make start` or `make install`); a bare
      // `python3` may not have the packages.
      interpreter: path.join(__dirname, '.venv', 'bin', 'python'),
      exec_mode: 'fork',
      // Every instance binds HTTP_PORT with SO_REUSEPORT; the kernel spreads
      // connections across them, and a reload replaces them one at a time.
      instances: Number(process.env.PM2_INSTANCES) || 2,
      max_memory_restart: '1G',
      log_date_format: 'YYYY-MM-DD HH:mm:ss Z',
      merge_logs: true,
      // The server sends PM2 "ready" (over NODE_CHANNEL_FD) once it listens;
      // PM2 marks it online, and goes on with a reload, only then.
      wait_ready: true,
      // Only a fallback: past this without "ready", PM2 carries on regardless.
      listen_timeout: 15 * SECOND,
      kill_timeout: Math.max(35, drainSeconds + 5) * SECOND,
      autorestart: true,
      env: {
        PYTHONUNBUFFERED: '1',
        PROMETHEUS_MULTIPROC_DIR: metricsDir,
      },
    },
  ],
};

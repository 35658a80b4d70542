// PM2 process file: `pm2 start ecosystem.config.js`, `pm2 reload azure-gpt-api`.
// Mirrors the original service's PM2 setup, with a Python interpreter.
const path = require('path');

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
      instances: Number(process.env.PM2_INSTANCES || 2),
      max_memory_restart: '1G',
      log_date_format: 'YYYY-MM-DD HH:mm:ss Z',
      merge_logs: true,
      // The server sends PM2 "ready" only once it listens.
      wait_ready: true,
      listen_timeout: 15000,
      // Longer than DRAIN_TIMEOUT (30 s by default), so in-flight streams
      // finish before PM2 resorts to SIGKILL.
      kill_timeout: 35000,
      autorestart: true,
      env: {
        PYTHONUNBUFFERED: '1',
      },
    },
  ],
};

"""Helpers the test modules share: SSE, metrics, bodies, deployments files, loopback servers."""

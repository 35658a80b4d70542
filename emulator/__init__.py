"""An offline stand-in for Azure OpenAI, for tests, the benchmark and `server.py --emulator`.

A development tool, not part of the gateway: nothing under `gateway/` or
`handlers/` imports it; only `server.py --emulator` starts it.
"""

from .azure import AzureEmulator, Fault, words

__all__ = ["AzureEmulator", "Fault", "words"]

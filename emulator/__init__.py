"""An offline stand-in for Azure OpenAI, for tests, the benchmark and `server.py --emulator`.

A development tool, not part of the gateway: nothing under `gateway/` or
`handlers/` imports it; only `server.py --emulator` starts it.
"""

from .answers import words
from .azure import AzureEmulator
from .faults import Fault

__all__ = ["AzureEmulator", "Fault", "words"]

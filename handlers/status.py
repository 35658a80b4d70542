"""GET /v1: the liveness answer the original service gave."""

from .base import BaseHandler


class StatusHandler(BaseHandler):
    route = "status"

    def get(self) -> None:
        self.write_json({"success": 1, "message": "GPT API: OK"})

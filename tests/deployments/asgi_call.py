"""One HTTP request driven by hand over ASGI, so a test decides when the client goes away and sees a stream
while it is in progress (httpx's ASGITransport buffers whole responses)."""

from __future__ import annotations

import asyncio
import json


class AsgiCall:
    def __init__(self, app, path: str, body: dict, disconnect_after_chunks: int | None = None):
        self.app = app
        self.body = json.dumps(body).encode()
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        }
        self.disconnect_after_chunks = disconnect_after_chunks
        self.disconnected = asyncio.Event()
        self.chunks: list[bytes] = []
        self.status: int | None = None
        self.is_complete = False  # the last body part was sent
        self._body_sent = False

    @property
    def events(self) -> list[str]:
        """The `data:` payloads received so far."""
        text = b"".join(self.chunks).decode()
        return [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]

    def disconnect(self) -> None:
        self.disconnected.set()

    async def receive(self):
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.is_complete = not message.get("more_body", False)
            if message.get("body"):
                self.chunks.append(message["body"])
                if self.disconnect_after_chunks is not None and len(self.chunks) >= self.disconnect_after_chunks:
                    self.disconnected.set()

    async def run(self):
        await self.app(self.scope, self.receive, self.send)

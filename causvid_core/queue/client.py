"""A small ComfyUI server client: HTTP with the standard library, the websocket through aiohttp (lazily).

Every failure that means "the server is not there right now" (refused, reset, closed, timed out, 502-504)
becomes ``ServerDown`` so the runner can wait and reconnect; a prompt the server refuses (HTTP 400 with
``node_errors``) becomes ``PromptRejected``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DOWN_STATUSES = (502, 503, 504)


class ServerDown(ConnectionError):
    """The server could not be reached, or the connection dropped."""


class PromptRejected(Exception):
    """POST /prompt answered an error: the server's ``error`` and ``node_errors`` are kept."""

    def __init__(self, status: int, body: dict) -> None:
        self.status = status
        self.error = body.get("error") or {}
        self.node_errors = body.get("node_errors") or {}
        super().__init__(describe_rejection(self.error, self.node_errors))


def describe_rejection(error: Any, node_errors: dict) -> str:
    """One line per problem: the server's message, then each offending node and input."""
    if isinstance(error, dict):
        head = error.get("message", "prompt rejected")
        if error.get("details") and not node_errors:
            head += f": {error['details']}"
    else:
        head = str(error or "prompt rejected")
    parts = [head]
    for node_id, entry in node_errors.items():
        for problem in entry.get("errors", []):
            name = (problem.get("extra_info") or {}).get("input_name") or problem.get("details", "")
            parts.append(
                f"node {node_id} ({entry.get('class_type', '?')}) input {name!r}: {problem.get('message', '')}"
                + (
                    f" ({problem['details']})"
                    if problem.get("details") and problem.get("details") != name
                    else ""
                )
            )
    return "; ".join(parts)


def normalize_base(server: str) -> str:
    """``127.0.0.1:8188`` or ``http://host:8188/`` -> ``http://host:8188``."""
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    scheme = urllib.parse.urlsplit(server).scheme
    if scheme not in ("http", "https"):
        raise ValueError(
            f"--server {server!r}: use an http:// or https:// address, e.g. http://127.0.0.1:8188"
        )
    return server


class Server:
    """HTTP calls to one ComfyUI server; ``timeout`` bounds each request in seconds."""

    def __init__(self, base: str, timeout: float = 30.0) -> None:
        self.base = normalize_base(base)
        self.timeout = timeout

    def _request(self, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as e:
            if e.code in DOWN_STATUSES:
                raise ServerDown(f"{self.base}{path}: HTTP {e.code}") from None
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerDown(f"{self.base}{path}: {reason}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:  # HTML or text: something else answers on that address
            raise ServerDown(f"{self.base}{path} answered something that is not JSON: not a ComfyUI server?") from None

    def get(self, path: str) -> Any:
        return self._request(path)

    def submit(self, prompt: dict, client_id: str, prompt_id: str) -> str:
        """POST /prompt with our own prompt id (so a dropped answer can be looked up); returns the id used."""
        try:
            answer = self._request(
                "/prompt", {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
            )
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read() or b"{}")
            except ValueError:
                body = {"error": f"HTTP {e.code}"}
            raise PromptRejected(e.code, body if isinstance(body, dict) else {"error": str(body)}) from None
        return str(answer.get("prompt_id", prompt_id))

    def history(self, prompt_id: str) -> dict | None:
        """GET /history/{id}: the finished prompt's entry (outputs, status), or None when not finished."""
        entry = self.get(f"/history/{urllib.parse.quote(prompt_id)}") or {}
        return entry.get(prompt_id)

    def queued_ids(self) -> set[str]:
        """Ids of the prompts running or pending (GET /queue: items are [number, prompt_id, ...])."""
        queue = self.get("/queue") or {}
        items = (queue.get("queue_running") or []) + (queue.get("queue_pending") or [])
        return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}

    def object_info(self) -> dict[str, dict]:
        return self.get("/object_info")

    def cancel(self, prompt_id: str) -> None:
        """Remove the prompt from the queue and interrupt it if it runs (best effort)."""
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self._request(path, body)
            except (ServerDown, urllib.error.HTTPError):
                pass

    def ws_url(self, client_id: str) -> str:
        scheme = "wss" if self.base.startswith("https") else "ws"
        return f"{scheme}://{self.base.split('://', 1)[1]}/ws?clientId={urllib.parse.quote(client_id)}"


class Socket:
    """A websocket to the server read synchronously (aiohttp on a private event loop)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        try:
            import aiohttp
        except ImportError:
            raise ImportError(
                "following progress needs aiohttp (ComfyUI's own environment has it): pip install aiohttp, "
                "or pass --poll to follow jobs by polling /history instead"
            ) from None
        self._aiohttp = aiohttp
        self._loop = asyncio.new_event_loop()
        self._session = None
        self._ws = None
        try:
            self._session = self._loop.run_until_complete(self._make_session())
            connect = self._session.ws_connect(url, heartbeat=None, max_msg_size=0)
            self._ws = self._loop.run_until_complete(asyncio.wait_for(connect, timeout))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            self.close()
            raise ServerDown(f"websocket {url}: {e}") from None

    async def _make_session(self) -> Any:
        return self._aiohttp.ClientSession()

    def receive(self, timeout: float) -> str | None:
        """The next text message; '' for a binary one (previews); None after ``timeout`` seconds of silence."""
        aiohttp = self._aiohttp
        try:
            message = self._loop.run_until_complete(self._ws.receive(timeout=timeout))
        except asyncio.TimeoutError:
            return None
        except (aiohttp.ClientError, OSError) as e:
            raise ServerDown(f"websocket: {e}") from None
        if message.type == aiohttp.WSMsgType.TEXT:
            return message.data
        if message.type == aiohttp.WSMsgType.BINARY:
            return ""
        raise ServerDown(f"websocket closed ({message.type.name})")

    def close(self) -> None:
        """Close the socket, the session and the private loop (safe to call twice)."""
        if self._loop.is_closed():
            return
        try:
            if self._ws is not None:
                self._loop.run_until_complete(asyncio.wait_for(self._ws.close(), 5))
        except Exception:  # closing a dead socket may fail in many ways; nothing to do about it
            pass
        try:
            if self._session is not None:
                self._loop.run_until_complete(self._session.close())
        finally:
            self._loop.close()

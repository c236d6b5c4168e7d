"""A kernel in a user's Hub-started Jupyter server, driven as JupyterLab drives it: the server's REST
API starts it, the kernel websocket (through the Hub's proxy, with a Hub token of the user) carries
the cells. The kernel is the server's own: its environment is what the Hub gave the server.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import websocket


@dataclass
class Outcome:
    """What one cell sent back."""

    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    results: list[str] = field(default_factory=list)
    status: str = ""


class ServerKernel:
    """One kernel of the server at ``server_url`` (``http://HUB/user/NAME/``)."""

    def __init__(self, server_url: str, token: str):
        self.base = server_url.rstrip("/") + "/"
        self.token = token
        reply = self._rest("POST", "api/kernels", {"name": "python3"})
        self.id = reply["id"]
        ws = self.base.replace("http://", "ws://") + f"api/kernels/{self.id}/channels"
        self.ws = websocket.create_connection(
            ws, header=[f"Authorization: token {token}"], timeout=30
        )
        self.session = uuid.uuid4().hex
        self._pending: dict[str, str] = {}  # msg id -> code, for cells sent without waiting

    def _rest(self, method: str, path: str, body: object = None) -> dict:
        req = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as reply:
            text = reply.read()
        return json.loads(text) if text else {}

    def send(self, code: str) -> str:
        """Send a cell without waiting for it; its message id (``wait`` collects it)."""
        msg_id = uuid.uuid4().hex
        self.ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": "test",
                        "session": self.session,
                        "msg_type": "execute_request",
                        "version": "5.3",
                        "date": "",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        return msg_id

    def wait(self, msg_id: str, timeout: float = 300) -> Outcome:
        """The outputs of the cell ``msg_id`` until its kernel is idle again."""
        out = Outcome()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ws.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    out.stdout += content["text"]
                else:
                    out.stderr += content["text"]
            elif kind == "error":
                out.error = f"{content['ename']}: {content['evalue']}\n" + "\n".join(
                    content.get("traceback") or ()
                )
            elif kind in ("execute_result", "display_data"):
                out.results.append(str(content.get("data", {}).get("text/plain", "")))
            elif kind == "status" and content["execution_state"] == "idle":
                out.status = "idle"
                return out
        raise AssertionError(f"the cell did not finish within {timeout:.0f} s: {out}")

    def run(self, code: str, timeout: float = 300) -> Outcome:
        return self.wait(self.send(code), timeout)

    def close(self) -> None:
        try:
            self.ws.close()
            self._rest("DELETE", f"api/kernels/{self.id}")
        except Exception:  # noqa: BLE001 - the server may be gone (culled, stopped): nothing to close
            pass

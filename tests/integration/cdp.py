"""Headless Chromium driven over the DevTools protocol, with the standard library only.

A minimal WebSocket client (RFC 6455: client handshake, masked text frames, ping/pong,
fragmented messages), a CDP connection on the browser endpoint with flattened sessions, and
the Chromium process itself. One thread: a call reads messages until its answer arrives and
keeps the events it saw on the way, so tests can look at them afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

#: Flags that work here as root, headless, with no network of its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)


class CdpError(AssertionError):
    """The browser answered a command with an error, or did not answer in time."""


class WebSocket:
    def __init__(self, url: str, timeout: float = 30) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
            raise ValueError(f"expected ws://host:port/path, got {url}")
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.reader = self.sock.makefile("rb")
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (
            f"GET {parts.path or '/'} HTTP/1.1\r\n"
            f"Host: {parts.hostname}:{parts.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        status = self.reader.readline().decode("latin-1")
        headers: dict[str, str] = {}
        while (line := self.reader.readline().decode("latin-1").strip()) != "":
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if not status.startswith("HTTP/1.1 101"):
            raise CdpError(f"WebSocket handshake refused: {status.strip()}")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise CdpError("WebSocket handshake: wrong Sec-WebSocket-Accept")

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.001))

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack("!H", n)
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", n)
        mask = secrets.token_bytes(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(OP_TEXT, text.encode())

    def _read_exact(self, n: int) -> bytes:
        data = self.reader.read(n)
        if data is None or len(data) != n:
            raise CdpError("WebSocket closed by the browser")
        return data

    def recv_text(self) -> str:
        """The next whole text message (answers pings, joins fragments)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read_exact(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read_exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read_exact(8))
            mask = self._read_exact(4) if b1 & 0x80 else b""
            payload = self._read_exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                raise CdpError("WebSocket closed by the browser")
            if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                parts.append(payload)
                if fin:
                    return b"".join(parts).decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(OP_CLOSE, struct.pack("!H", 1000))
        self.reader.close()
        self.sock.close()


@dataclass
class Event:
    method: str
    params: dict[str, Any]
    session: str | None


@dataclass
class Cdp:
    """One connection to the browser endpoint; pages are reached through session ids."""

    ws: WebSocket
    events: list[Event] = field(default_factory=list)
    _next_id: int = 0

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 60,
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        self.ws.send_text(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline, f"{method} got no answer within {timeout} s")
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise CdpError(f"{method} failed: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result

    def _read(self, deadline: float, why: str) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CdpError(why)
        self.ws.settimeout(remaining)
        try:
            msg: dict[str, Any] = json.loads(self.ws.recv_text())
        except TimeoutError as e:
            raise CdpError(why) from e
        if "method" in msg and "id" not in msg:
            self.events.append(Event(msg["method"], msg.get("params", {}), msg.get("sessionId")))
        return msg

    def wait_event(
        self, method: str, session: str | None, timeout: float = 60, since: int = 0
    ) -> Event:
        """The first event `method` of `session` at or after index `since` of `events`."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events[since:]:
                if e.method == method and e.session == session:
                    return e
            self._read(deadline, f"no {method} within {timeout} s")


class Tab:
    """One page target, attached with its own session."""

    def __init__(self, cdp: Cdp) -> None:
        self.cdp = cdp
        target = cdp.call("Target.createTarget", {"url": "about:blank"})
        self.target_id: str = target["targetId"]
        attached = cdp.call("Target.attachToTarget", {"targetId": self.target_id, "flatten": True})
        self.session: str = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.cdp.call(method, params, self.session)

    def navigate(self, url: str, timeout: float = 60) -> None:
        since = len(self.cdp.events)
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {result['errorText']}")
        self.cdp.wait_event("Page.loadEventFired", self.session, timeout, since)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Polls `expression` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CdpError(f"{expression!r} stayed falsy for {timeout} s")
            time.sleep(0.05)

    def problems(self) -> list[str]:
        """Console messages, uncaught exceptions and browser log errors/warnings of this tab."""
        out = []
        for e in self.cdp.events:
            if e.session != self.session:
                continue
            if e.method == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description"))) for a in e.params["args"])
                out.append(f"console.{e.params['type']}: {args}")
            elif e.method == "Runtime.exceptionThrown":
                out.append(f"exception: {e.params['exceptionDetails']}")
            elif e.method == "Log.entryAdded" and e.params["entry"]["level"] in (
                "error",
                "warning",
            ):
                entry = e.params["entry"]
                out.append(f"log {entry['level']} ({entry['source']}): {entry['text']}")
        return out

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) in the middle of the element."""
        box = self.evaluate(
            "(() => { const el = document.querySelector(" + json.dumps(selector) + ");"
            " if (!el) return null; el.scrollIntoView({block: 'center'});"
            " const r = el.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2,"
            " w: r.width, h: r.height}; })()"
        )
        if not box or not box["w"] or not box["h"]:
            raise CdpError(f"nothing visible to click at {selector!r}: {box}")
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    def screenshot(self, path: Path, width: int, mobile: bool, scale: float = 1) -> None:
        """The whole page (not just the viewport) at `width` CSS pixels."""
        metrics = {"width": width, "height": 900, "deviceScaleFactor": scale, "mobile": mobile}
        self.call("Emulation.setDeviceMetricsOverride", metrics)
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.cdp.call("Target.closeTarget", {"targetId": self.target_id})


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise AssertionError(
        "no Chromium: `apt-get install chromium` (or run `bash tests/host-setup.sh`)"
    )


class Chromium:
    """Headless Chromium with a fresh profile, its DevTools port chosen by itself."""

    def __init__(self, workdir: Path, extra_flags: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.profile = workdir / "profile"
        self.log = workdir / "chromium.log"
        self.extra_flags = extra_flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.cdp: Cdp | None = None

    def start(self, deadline: float = 60) -> Cdp:
        self.profile.mkdir(parents=True, exist_ok=True)
        argv = [
            chromium_binary(),
            *CHROMIUM_FLAGS,
            *self.extra_flags,
            f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        port_file = self.profile / "DevToolsActivePort"
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"Chromium exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            lines = port_file.read_text().split("\n") if port_file.exists() else []
            if len(lines) >= 2 and lines[0].strip() and lines[1].strip():
                break
            if time.monotonic() > end:
                self.stop()
                raise AssertionError(f"Chromium opened no DevTools port within {deadline} s")
            time.sleep(0.05)
        url = f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
        self.cdp = Cdp(WebSocket(url))
        return self.cdp

    def stop(self) -> None:
        if self.cdp is not None:
            with contextlib.suppress(CdpError, OSError):
                self.cdp.call("Browser.close", timeout=10)
            self.cdp.ws.close()
            self.cdp = None
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: only its children
            self.proc.wait(timeout=15)

"""Headless chromium (Debian's ``chromium``) driven over the DevTools protocol with a small
websocket client: enough to open a page, type into it, click, read the DOM and take a
screenshot, without a browser-automation framework. And a PNG reader for the screenshot."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

import requests
import websocket

from .services import wait_for


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "the page test needs headless chromium: apt-get install chromium (make test installs "
        "it when run as root on Debian)"
    )


class Browser:
    """One headless chromium with one tab, driven through the DevTools protocol."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="fusillade-chromium-")
        self.proc = subprocess.Popen(
            [
                chromium_binary(),
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,800",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        endpoint = ""
        for text in self.proc.stderr:
            match = re.search(r"DevTools listening on (ws://\S+)", text)
            if match:
                endpoint = match.group(1)
                break
        if not endpoint:
            raise RuntimeError("chromium did not start its DevTools endpoint")
        http = "http://" + endpoint.split("/")[2]
        tab = next(
            t for t in requests.get(http + "/json/list", timeout=10).json() if t["type"] == "page"
        )
        self.ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=30)
        self._id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.eval("document.readyState") == "complete", 20, what=f"load {url}")

    def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type as a user does (keyboard input, not a script)."""
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path, selector: str | None = None) -> bytes:
        """A PNG of the page (or of the element ``selector`` covers), also written to path."""
        params: dict[str, Any] = {"format": "png"}
        if selector is not None:
            box = self.eval(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
            )
            x, y, w, h = box
            params["clip"] = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait(10)
            assert self.proc.stderr is not None
            self.proc.stderr.close()
            shutil.rmtree(self.profile, ignore_errors=True)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA PNG (what chromium
    writes), unfiltered: enough to count the pixels of a colour."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def count_colour(data: bytes, rgb: tuple[int, int, int], tolerance: int = 8) -> int:
    width, _, rows = png_pixels(data)
    channels = len(rows[0]) // width
    found = 0
    for row in rows:
        for x in range(0, len(row), channels):
            if all(abs(row[x + c] - rgb[c]) <= tolerance for c in range(3)):
                found += 1
    return found

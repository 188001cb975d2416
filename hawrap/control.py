"""The control socket: ``hawrap status/standby/resume/failover/failback`` talk to the running
node over a Unix socket in its state dir (owner-only permissions), one JSON request and one
JSON answer per connection."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable

from .errors import HawrapError, NotRunning

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024


class ControlServer:
    def __init__(self, path: str, handler: Callable[[dict], dict]):
        self.path = path
        self.handler = handler
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(8)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="control-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                data = b""
                while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                answer = self.handler(request)
            except (ValueError, OSError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            except Exception as exc:  # the daemon must survive any one bad request
                log.exception("control request failed")
                answer = {"ok": False, "error": str(exc)}
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def request(path: str, command: str, timeout: float = 60.0, **args) -> dict:
    """Send one command to the node listening on ``path``; raise NotRunning if none does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"no hawrap node answers on {path} (is 'hawrap run' running?)") from exc
        sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError as exc:
        raise HawrapError(f"the hawrap node on {path} did not answer within {timeout:g} s") from exc
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError as exc:
        raise HawrapError(f"garbled answer from the hawrap node on {path}") from exc

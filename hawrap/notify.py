"""Tell the administrator: mail through the configured SMTP host and/or a command.

The command is called like a keepalived notify script, so existing scripts work:
``COMMAND INSTANCE <cluster>/<node> <STATE> <epoch>`` with STATE MASTER (primary), BACKUP
(secondary), FAULT (standby), or the role in capitals otherwise; the details are in the
environment: HAWRAP_EVENT, HAWRAP_MESSAGE, HAWRAP_NODE, HAWRAP_PEER, HAWRAP_ROLE,
HAWRAP_EPOCH, HAWRAP_CLUSTER, HAWRAP_TIME, HAWRAP_ID (unique per notification: a script run
twice for the same notification can tell).

Delivery runs in its own thread: a slow mail server never delays a takeover.
"""

from __future__ import annotations

import logging
import os
import queue
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from email.message import EmailMessage

from .config import NotifyConfig

log = logging.getLogger(__name__)

KEEPALIVED_STATES = {"primary": "MASTER", "secondary": "BACKUP", "standby": "FAULT"}


@dataclass(frozen=True)
class Notification:
    event: str
    message: str
    cluster: str
    node: str
    peer: str
    role: str
    epoch: int
    time: float
    id: str


class Notifier:
    def __init__(self, cfg: NotifyConfig, cluster: str, node: str, peer: str):
        self.cfg = cfg
        self.cluster, self.node, self.peer = cluster, node, peer
        self._queue: queue.Queue[Notification | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()
        self.sent: list[Notification] = []  # what was delivered (for status)

    def notify(self, event: str, message: str, role: str, epoch: int) -> Notification:
        n = Notification(event, message, self.cluster, self.node, self.peer, role, epoch, time.time(), uuid.uuid4().hex)
        log.warning("notify [%s] %s", event, message)
        self._queue.put(n)
        return n

    def close(self, timeout: float = 15.0) -> None:
        """Deliver what is queued (bounded by ``timeout``), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            n = self._queue.get()
            if n is None:
                return
            if self.cfg.command:
                self._run_command(n)
            if self.cfg.smtp_host:
                self._send_mail(n)
            self.sent.append(n)
            del self.sent[:-100]

    def _run_command(self, n: Notification) -> None:
        state = KEEPALIVED_STATES.get(n.role, n.role.upper())
        argv = [*self.cfg.command, "INSTANCE", f"{n.cluster}/{n.node}", state, str(n.epoch)]
        env = dict(os.environ)
        env.update(
            HAWRAP_EVENT=n.event, HAWRAP_MESSAGE=n.message, HAWRAP_NODE=n.node, HAWRAP_PEER=n.peer,
            HAWRAP_ROLE=n.role, HAWRAP_EPOCH=str(n.epoch), HAWRAP_CLUSTER=n.cluster,
            HAWRAP_TIME=f"{n.time:.6f}", HAWRAP_ID=n.id,
        )  # fmt: skip
        try:
            proc = subprocess.run(
                argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.cfg.timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("notify command %s failed: %s", argv[0], exc)
            return
        if proc.returncode != 0:
            log.error("notify command %s exited %d: %s", argv[0], proc.returncode, proc.stderr.decode(errors="replace")[-300:])

    def _send_mail(self, n: Notification) -> None:
        msg = EmailMessage()
        msg["From"] = self.cfg.mail_from
        msg["To"] = ", ".join(self.cfg.mail_to)
        msg["Subject"] = f"[hawrap {n.cluster}] {n.node}: {n.event} ({n.role}, epoch {n.epoch})"
        msg["Message-ID"] = f"<{n.id}@{socket.gethostname()}>"
        msg.set_content(
            f"{n.message}\n\ncluster: {n.cluster}\nnode: {n.node}\npeer: {n.peer}\nrole: {n.role}\n"
            f"epoch: {n.epoch}\ntime: {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(n.time))}\n"
        )
        try:
            with smtplib.SMTP(self.cfg.smtp_host, self.cfg.smtp_port, timeout=self.cfg.timeout) as smtp:
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as exc:
            log.error("notify mail via %s:%d failed: %s", self.cfg.smtp_host, self.cfg.smtp_port, exc)

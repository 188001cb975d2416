"""Resources a primary holds: the virtual IP and the services, with OCF semantics.

Every action is idempotent: ``start`` on a running resource and ``stop`` on a stopped one
succeed without doing anything, so deciding again after a crash or a restart is harmless.

Exit codes follow the OCF resource agent contract (``OCF_SUCCESS`` 0, ``OCF_ERR_GENERIC`` 1,
..., ``OCF_NOT_RUNNING`` 7): a service's ``monitor`` command says 0 when it runs, 7 when it
is cleanly stopped, anything else when it failed.

The virtual IP:

* ``check_free``: a duplicate address check (an ARP probe): if another host answers for the
  address, taking it would split the LAN's ARP caches, so a takeover stops there, before it
  has changed anything.
* ``start``: ``ip addr add``, then a gratuitous ARP so that clients and routers switch at
  once, repeated a few times in the background in case the first is lost.  The repeats
  belong to that holding: each one first checks that the address is still here, and
  ``stop`` ends them.
* ``stop``: ``ip addr del``.  ``monitor``: is the address on the interface.

Whether an ``ip`` command worked is judged by the interface afterwards, never by the
wording of its error (which changes between kernels: "File exists", "Address already
assigned").
* ``kind = "dummy"`` replaces all of that by a marker file: the demo and unit tests run
  without root.

Both ``arping`` implementations found on Linux are supported (Thomas Habets' ``arping``
package and iputils' ``arping``); their options differ, so the flavour is detected once.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time

from . import arp
from .config import ServiceConfig, VipConfig
from .errors import ResourceError

log = logging.getLogger(__name__)

REFRESH_FRESH = 0.2  # seconds: how recent the sight of the address must be to renew it

OCF_SUCCESS = 0
OCF_ERR_GENERIC = 1
OCF_ERR_ARGS = 2
OCF_ERR_UNIMPLEMENTED = 3
OCF_ERR_PERM = 4
OCF_ERR_INSTALLED = 5
OCF_ERR_CONFIGURED = 6
OCF_NOT_RUNNING = 7
OCF_MEANINGS = {
    0: "success / running",
    1: "generic error",
    2: "invalid arguments",
    3: "unimplemented action",
    4: "insufficient permissions",
    5: "not installed",
    6: "not configured",
    7: "not running",
    8: "running as master",
    9: "failed as master",
}


def ocf_meaning(code: int) -> str:
    return OCF_MEANINGS.get(code, "unknown exit code")


def run_command(
    argv: tuple[str, ...] | list[str], timeout: float, shell: bool = False, env: dict | None = None
) -> tuple[int, str]:
    """Run a resource command; returns (exit code, last lines of its output)."""
    cmd = argv[0] if shell else list(argv)
    try:
        proc = subprocess.run(
            cmd, shell=shell, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=timeout, env=env, start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return OCF_ERR_GENERIC, f"timed out after {timeout:g} s"
    except FileNotFoundError:
        return OCF_ERR_INSTALLED, f"{cmd if shell else argv[0]}: command not found"
    except PermissionError:
        return OCF_ERR_PERM, f"{argv[0]}: permission denied"
    return proc.returncode, proc.stdout.decode(errors="replace").strip()[-500:]


class Resource:
    name: str

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError


class Service(Resource):
    """A service driven by start/stop/monitor commands (OCF exit codes)."""

    def __init__(self, cfg: ServiceConfig, env: dict | None = None):
        self.cfg = cfg
        self.name = cfg.name
        self.env = env

    def _run(self, which: str) -> tuple[int, str]:
        return run_command(getattr(self.cfg, which), self.cfg.timeout, self.cfg.shell, self.env)

    def monitor(self) -> int:
        code, out = self._run("monitor")
        if code not in (OCF_SUCCESS, OCF_NOT_RUNNING):
            log.warning("service %s: monitor exited %d (%s): %s", self.name, code, ocf_meaning(code), out)
        return code

    def running(self) -> bool:
        return self.monitor() == OCF_SUCCESS

    def start(self) -> None:
        if self.monitor() == OCF_SUCCESS:
            return
        code, out = self._run("start")
        if code != OCF_SUCCESS:
            raise ResourceError(
                f"service {self.name}: start exited {code} ({ocf_meaning(code)}): {out}", code
            )
        self._wait_for(OCF_SUCCESS, "start")

    def stop(self) -> None:
        if self.monitor() == OCF_NOT_RUNNING:
            return
        code, out = self._run("stop")
        if code != OCF_SUCCESS:
            raise ResourceError(f"service {self.name}: stop exited {code} ({ocf_meaning(code)}): {out}", code)
        self._wait_for(OCF_NOT_RUNNING, "stop")

    def _wait_for(self, wanted: int, action: str) -> None:
        deadline = time.monotonic() + self.cfg.timeout
        delay = 0.005
        while True:
            code = self.monitor()
            if code == wanted:
                return
            if time.monotonic() >= deadline:
                raise ResourceError(
                    f"service {self.name}: after {action}, monitor still says {code} ({ocf_meaning(code)}) "
                    f"after {self.cfg.timeout:g} s",
                    code,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def arping_flavour(configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    exe = shutil.which("arping")
    if exe is None:
        raise ResourceError("arping is not installed (apt-get install arping)", OCF_ERR_INSTALLED)
    out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
    text = out.stdout + out.stderr
    return "habets" if "Habets" in text else "iputils"


class VirtualIP(Resource):
    """``ip addr`` + duplicate check + gratuitous ARP; or a marker file for ``kind = "dummy"``."""

    def __init__(self, cfg: VipConfig, interface: str, state_dir: str):
        self.cfg = cfg
        self.interface = interface
        self.name = f"vip {cfg.address} on {interface}"
        self.marker = os.path.join(state_dir, "dummy-vip")
        self._flavour: str | None = None
        self._garp_thread: threading.Thread | None = None
        self._garp_stop = threading.Event()
        self._arp = arp.ArpSocket(interface)
        self._arp_lock = threading.Lock()  # the node's loop and the announcement thread share it

    # -- dummy kind
    def _dummy_start(self) -> None:
        with open(self.marker, "w") as f:
            f.write(self.cfg.address + "\n")

    def _dummy_stop(self) -> None:
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            pass

    # -- ip kind
    def _ip(self, *args: str) -> tuple[int, str]:
        return run_command(("ip", *args), 10.0)

    def running(self) -> bool:
        if self.cfg.kind == "dummy":
            return os.path.exists(self.marker)
        code, out = self._ip("-o", "-4", "addr", "show", "dev", self.interface)
        if code != 0:
            return False
        return any(
            f" {self.cfg.address} " in f" {line} " or f"inet {self.cfg.address} " in line
            for line in out.splitlines()
        )

    def flavour(self) -> str:
        if self._flavour is None:
            self._flavour = "builtin" if self.cfg.arping == "builtin" else arping_flavour(self.cfg.arping)
        return self._flavour

    def duplicate(self) -> str | None:
        """Who else answers ARP for the address (a description), or None."""
        ip = self.cfg.ip
        flavour = self.flavour()
        if flavour == "builtin":
            try:
                with self._arp_lock:
                    return self._arp.probe(ip, self.cfg.dad_timeout)
            except OSError as exc:
                raise ResourceError(f"{self.name}: duplicate check failed: {exc}", OCF_ERR_GENERIC) from exc
        timeout = f"{self.cfg.dad_timeout:g}"
        if flavour == "habets":
            # -0: source 0.0.0.0 (we do not own it yet); exit 0 means someone replied
            argv = ("arping", "-0", "-c", "1", "-C", "1", "-w", timeout, "-i", self.interface, ip)
            code, out = run_command(argv, 10.0)
            if "arping:" in out and code != 0 and "Timeout" not in out:
                raise ResourceError(f"{self.name}: duplicate check failed: {out}", OCF_ERR_GENERIC)
            return (
                out.splitlines()[1]
                if code == 0 and len(out.splitlines()) > 1
                else ("answered" if code == 0 else None)
            )
        # iputils: -D is duplicate address detection; exit 0 means no reply (address free)
        argv = (
            "arping",
            "-D",
            "-c",
            "1",
            "-w",
            str(max(1, round(self.cfg.dad_timeout))),
            "-I",
            self.interface,
            ip,
        )
        code, out = run_command(argv, 10.0)
        return None if code == 0 else (out.splitlines()[-1] if out else "answered")

    def gratuitous_arp(self) -> None:
        ip = self.cfg.ip
        flavour = self.flavour()
        if flavour == "builtin":
            try:
                with self._arp_lock:
                    self._arp.gratuitous(ip)
            except OSError as exc:
                log.warning("%s: gratuitous ARP failed: %s", self.name, exc)
            return
        if flavour == "habets":
            argv = ("arping", "-U", "-c", "1", "-w", "0", "-S", ip, "-i", self.interface, ip)
        else:
            argv = ("arping", "-U", "-c", "1", "-I", self.interface, ip)
        code, out = run_command(argv, 10.0)
        if code > 1:
            log.warning("%s: gratuitous ARP failed (%d): %s", self.name, code, out)

    def prepare(self) -> None:
        """Open what a takeover needs ahead of time (the packet socket): off its critical path."""
        if self.cfg.kind == "ip" and self.flavour() == "builtin":
            with self._arp_lock:
                try:
                    self._arp._open()
                except OSError as exc:
                    log.warning("%s: cannot open an ARP socket yet: %s", self.name, exc)

    def close(self) -> None:
        self._stop_garp()
        with self._arp_lock:
            self._arp.close()

    def check_free(self) -> None:
        """Raise ResourceError if another host answers ARP for the address (nothing is changed)."""
        if self.cfg.kind == "dummy":
            return
        other = self.duplicate()
        if other:
            raise ResourceError(
                f"{self.name}: another host already answers for {self.cfg.ip} ({other}); "
                "not taking it (both would answer ARP)",
                OCF_ERR_GENERIC,
            )

    def start(self, check: bool = True, lifetime: int | None = None) -> None:
        """Add the address (after ``check_free`` unless the caller just did it) and announce it.
        ``lifetime``: seconds before the kernel drops it unless refreshed (default ``vip.lifetime``)."""
        if self.cfg.kind == "dummy":
            self._dummy_start()
            return
        if check:
            self.check_free()
        args = ["addr", "add", self.cfg.address, "dev", self.interface]
        lifetime = self.cfg.lifetime if lifetime is None else lifetime
        if lifetime:
            args += ["valid_lft", str(lifetime), "preferred_lft", str(lifetime)]
        code, out = self._ip(*args)
        if code != 0 and not self.running():
            raise ResourceError(f"{self.name}: ip addr add failed: {out}", OCF_ERR_GENERIC)
        self._announce()

    def announce(self) -> bool:
        """Announce the address again (a clashing peer was pushed back), only if it is here:
        an announcement for an address we do not hold would pull clients to a node that
        cannot answer them.  Returns whether it was announced."""
        if self.cfg.kind == "dummy" or not self.running():
            return False
        self._announce()
        return True

    def _announce(self) -> None:
        """``garp_count`` gratuitous ARPs ``garp_interval`` apart.  The built-in first one goes
        out at once (microseconds); the rest, and all of an external arping's, from a
        background thread, so the services start meanwhile."""
        self._stop_garp()
        stop = self._garp_stop = threading.Event()
        count, wait_first = self.cfg.garp_count, False
        if self.flavour() == "builtin":
            self.gratuitous_arp()
            count, wait_first = count - 1, True

        def repeat():
            for i in range(count):
                if (i or wait_first) and stop.wait(self.cfg.garp_interval):
                    return
                # The address may have gone without stop() (expired, removed by hand): a
                # repeat never outlives the holding it was started for.
                if not self.running():
                    return
                self.gratuitous_arp()

        if count > 0:
            self._garp_thread = threading.Thread(target=repeat, name="garp", daemon=True)
            self._garp_thread.start()

    def _stop_garp(self) -> None:
        self._garp_stop.set()
        if self._garp_thread is not None:
            self._garp_thread.join()
            self._garp_thread = None

    def refresh(self, seen_at: float, lifetime: int | None = None) -> None:
        """Renew the address lifetime (``lifetime`` > 0): a dead hawrap lets it expire.

        ``ip addr change`` adds the address if it is gone (the kernel ignores the missing
        NLM_F_CREATE), so a renewal must never run on stale knowledge: only just after the
        address was seen here (``seen_at``, monotonic), and it looks once more right before.
        A node that was frozen between the two, and whose address expired meanwhile (the
        peer may hold it now), would otherwise bring it back without any check."""
        lifetime = self.cfg.lifetime if lifetime is None else lifetime
        if self.cfg.kind != "ip" or not lifetime:
            return
        if time.monotonic() - seen_at > REFRESH_FRESH or not self.running():
            return
        lifetime = str(lifetime)
        self._ip(
            "addr",
            "change",
            self.cfg.address,
            "dev",
            self.interface,
            "valid_lft",
            lifetime,
            "preferred_lft",
            lifetime,
        )

    def stop(self) -> None:
        self._stop_garp()
        if self.cfg.kind == "dummy":
            self._dummy_stop()
            return
        code, out = self._ip("addr", "del", self.cfg.address, "dev", self.interface)
        if code != 0 and self.running():
            raise ResourceError(f"{self.name}: ip addr del failed: {out}", OCF_ERR_GENERIC)


class ResourceGroup:
    """The VIP then the services, started in order and stopped in reverse."""

    def __init__(self, vip: VirtualIP | None, services: list[Service]):
        self.vip = vip
        self.services = services

    def _all(self) -> list[Resource]:
        return ([self.vip] if self.vip is not None else []) + list(self.services)

    def start(self, checked: bool = False) -> None:
        """Start everything in order; ``checked``: the VIP's duplicate check was just done."""
        for resource in self._all():
            started = time.monotonic()
            if resource is self.vip:
                self.vip.start(check=not checked)
            else:
                resource.start()
            log.info("%s started in %.0f ms", resource.name, (time.monotonic() - started) * 1000)

    def failed(self) -> list[str]:
        """The names of the resources that are not running (a monitor, in start order)."""
        return [r.name for r in self._all() if not r.running()]

    def restart(self, names: list[str]) -> None:
        """Start again the resources named (those ``failed`` found), in start order, and
        nothing else: a running service is never bounced because another one failed.  A
        failed service is stopped first, as OCF asks, in case part of it lingers."""
        for resource in self._all():
            if resource.name not in names:
                continue
            started = time.monotonic()
            if resource is not self.vip:
                try:
                    resource.stop()
                except ResourceError as exc:
                    log.warning("%s: stop before restart failed: %s", resource.name, exc)
            resource.start()
            log.info("%s restarted in %.0f ms", resource.name, (time.monotonic() - started) * 1000)

    def stop_services(self) -> list[str]:
        errors = []
        for service in reversed(self.services):
            try:
                service.stop()
            except ResourceError as exc:
                errors.append(str(exc))
        return errors

    def stop(self) -> list[str]:
        """Stop everything, continuing past failures (each is returned)."""
        errors = self.stop_services()
        if self.vip is not None:
            try:
                self.vip.stop()
            except ResourceError as exc:
                errors.append(str(exc))
        return errors

    def vip_present(self) -> bool:
        return self.vip is not None and self.vip.running()

    def prepare(self) -> None:
        if self.vip is not None:
            self.vip.prepare()

    def close(self) -> None:
        if self.vip is not None:
            self.vip.close()

    def failed_services(self) -> list[str]:
        return [s.name for s in self.services if s.monitor() != OCF_SUCCESS]

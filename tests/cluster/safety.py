"""The safety properties of the fault tests, sampled continuously while a fault runs.

Two samplers run side by side for the whole scenario:

* ``sampler.py`` in the client's namespace (every 50 ms): which MACs answer ARP for the VIP,
  whether the service answers on each node's own address, and every ARP frame that claims
  the VIP;
* a thread here (every 50 ms): which nodes have the VIP on their interface (``ip addr``).

``Safety.check()`` then asserts, over the whole run:

* never two nodes answering ARP for the VIP in one round (two holders as clients see them);
* never the service answering on both nodes in one round;
* never the VIP on both nodes' interfaces in one sample (``strict``: for scenarios where no
  node is cut off from the LAN, so a second address would be a second holder);
* never an ARP frame claiming the VIP from a node that did not hold it at that moment (a
  stale announcement: it would pull clients to a node that no longer serves them).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from lab import HERE, NODE_LAN, SERVICE_PORT, VIP, Lab
from netlab import VipWatch

PERIOD = 0.05
STALE_MARGIN = 0.15  # an announcement this close to a sample showing the holding is not stale


@dataclass
class Report:
    rounds: int = 0
    two_arp_holders: list[float] = field(default_factory=list)
    service_on_both: list[float] = field(default_factory=list)
    vip_on_both: list[float] = field(default_factory=list)
    stale_announcements: list[tuple[float, str]] = field(default_factory=list)
    samples: int = 0


class Safety:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.macs = {lab.mac(n): n for n in ("a", "b")}
        self.out = os.path.join(lab.workdir, "sampler.jsonl")
        argv = [
            sys.executable,
            os.path.join(HERE, "sampler.py"),
            "--vip",
            VIP,
            "--port",
            str(SERVICE_PORT),
            "--out",
            self.out,
        ]
        for node in ("a", "b"):
            argv += ["--node", f"{node}={NODE_LAN[node]}"]
        self.proc = lab.spawn("c", argv, "sampler.log")
        self.vip = VipWatch(lab.vip_on, ("a", "b"), PERIOD)
        self.holding = self.vip.holding

    def stop(self) -> None:
        try:
            self.vip.stop()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(10)

    def rounds(self) -> list[dict]:
        out = []
        try:
            with open(self.out) as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        except FileNotFoundError:
            pass
        return out

    def report(self, since: float = 0.0) -> Report:
        rep = Report()
        lines = [r for r in self.rounds() if r["t"] >= since]
        answered: dict[str, list[float]] = {n: [] for n in ("a", "b")}
        frames = []
        for r in lines:
            if "arp" in r:
                rep.rounds += 1
                if len(r["arp"]) > 1:
                    rep.two_arp_holders.append(r["t"])
                if all(r["svc"].values()):
                    rep.service_on_both.append(r["t"])
                for mac in r["arp"]:
                    answered[self.macs.get(mac, mac)] = answered.get(self.macs.get(mac, mac), []) + [r["t"]]
            else:
                frames.append(r)
        held_at: dict[str, list[float]] = {n: [] for n in ("a", "b")}
        for t, held in self.holding:
            if t < since:
                continue
            rep.samples += 1
            if len(held) > 1:
                rep.vip_on_both.append(t)
            for n in held:
                held_at[n].append(t)
        for fr in frames:
            node = self.macs.get(fr["mac"], fr["mac"])
            near = [
                x for x in answered.get(node, []) + held_at.get(node, []) if abs(x - fr["t"]) <= STALE_MARGIN
            ]
            if not near:
                rep.stale_announcements.append((fr["t"], node))
        return rep

    def check(self, since: float = 0.0, strict: bool = True) -> Report:
        rep = self.report(since)
        assert rep.rounds > 0 and rep.samples > 0, "the safety samplers recorded nothing"
        assert not rep.two_arp_holders, f"two nodes answered ARP for the VIP at {rep.two_arp_holders[:5]}"
        assert not rep.service_on_both, f"the service answered on both nodes at {rep.service_on_both[:5]}"
        assert not rep.stale_announcements, (
            f"ARP claims for the VIP from a node not holding it: {rep.stale_announcements[:5]}"
        )
        if strict:
            assert not rep.vip_on_both, f"the VIP was on both nodes at {rep.vip_on_both[:5]}"
        return rep

"""The heartbeat packet: msgpack body, HMAC-SHA256 over it, and replay/spoof rejection.

Layout: ``b"HW1" + HMAC-SHA256(secret, b"HW1" + body) + body``.  The body is a msgpack map
(see ``FIELDS``).  A packet is dropped, never half-believed, when it is too large, when the
MAC does not match, when a field is missing or has the wrong type, or when the tracker says
it is a replay.

Replay protection (``PeerTracker``): every process start of a heartbeat sender picks a
random *boot id*; within a boot the sequence number rises with every round (per link: the
packet names the link it was sent on, so a packet captured on one link cannot be replayed
on another).  A new boot id is believed only when its packet echoes *our* current boot id
(``peer_boot``), which a packet recorded before we started cannot do; boot ids that were
replaced are retired and never accepted again.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from dataclasses import dataclass

import msgpack

from .errors import WireAuthError, WireError

MAGIC = b"HW1"
VERSION = 2  # 2: the data state (uptodate, in_sync)
MAC_SIZE = 32
MAX_PACKET = 1400  # one Ethernet frame; checked before anything is parsed
MAX_RETIRED_BOOTS = 64

ROLES = ("init", "secondary", "primary", "standby", "releasing")
REQUESTS = (None, "handover", "push_back", "take_over")

# field -> accepted types
FIELDS: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "cluster": (str,),
    "node": (str,),
    "link": (str,),
    "boot": (bytes,),
    "seq": (int,),
    "peer_boot": (bytes, type(None)),
    "role": (str,),
    "epoch": (int,),
    "owns_epoch": (bool,),
    "standby": (bool,),
    "lan_ok": (bool, type(None)),
    "serving": (bool,),
    "request": (str, type(None)),
    "links": (dict,),
    "uptodate": (bool,),
    "in_sync": (bool,),
}
# Fields a peer of the same version may leave out (an older release), with their value then.
OPTIONAL: dict[str, tuple[tuple[type, ...], object]] = {
    "incomplete": ((bool,), False),  # a new disk not yet mirrored onto (hawrap.treedisk)
    "ahead": ((bool,), False),  # it served while its peer's copy did not get its changes
}


def encode(secret: bytes, fields: dict) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    packet = MAGIC + hmac.new(secret, MAGIC + body, hashlib.sha256).digest() + body
    if len(packet) > MAX_PACKET:
        raise WireError(f"heartbeat packet of {len(packet)} bytes exceeds {MAX_PACKET}")
    return packet


def decode(secret: bytes, packet: bytes) -> dict:
    """Authenticate and parse one packet; WireError says why it is dropped."""
    if len(packet) > MAX_PACKET:
        raise WireError(f"packet of {len(packet)} bytes is larger than {MAX_PACKET}")
    if len(packet) < len(MAGIC) + MAC_SIZE + 1 or not packet.startswith(MAGIC):
        raise WireError("not a hawrap heartbeat packet")
    mac = packet[len(MAGIC) : len(MAGIC) + MAC_SIZE]
    body = packet[len(MAGIC) + MAC_SIZE :]
    expected = hmac.new(secret, MAGIC + body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise WireAuthError("authentication failed (wrong shared secret, or a forged packet)")
    try:
        fields = msgpack.unpackb(
            body, raw=False, strict_map_key=True,
            max_str_len=256, max_bin_len=64, max_array_len=16, max_map_len=32,
        )  # fmt: skip
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError(f"malformed heartbeat body: {exc}") from exc
    if not isinstance(fields, dict):
        raise WireError("malformed heartbeat body: not a map")
    for name, types in FIELDS.items():
        if name not in fields:
            raise WireError(f"heartbeat field {name!r} missing")
        value = fields[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise WireError(f"heartbeat field {name!r} has type {type(value).__name__}")
    for name, (types, default) in OPTIONAL.items():
        value = fields.setdefault(name, default)
        if not isinstance(value, types):
            raise WireError(f"heartbeat field {name!r} has type {type(value).__name__}")
    if fields["v"] != VERSION:
        raise WireError(
            f"heartbeat version {fields['v']} is not supported (this hawrap speaks {VERSION}: run the same version on both nodes)"
        )
    if fields["role"] not in ROLES or fields["request"] not in REQUESTS:
        raise WireError(f"unknown role {fields['role']!r} or request {fields['request']!r}")
    if fields["seq"] < 0 or fields["epoch"] < 0 or len(fields["boot"]) != 16:
        raise WireError("heartbeat sequence, epoch or boot id out of range")
    if not all(isinstance(k, str) and isinstance(v, bool) for k, v in fields["links"].items()):
        raise WireError("heartbeat field 'links' must map link names to booleans")
    return fields


@dataclass
class Verdict:
    accepted: bool
    reason: str = ""
    new_boot: bool = False


class PeerTracker:
    """Decides which authenticated packets from the peer are fresh.  Pure: no I/O, no clock."""

    def __init__(self, my_boot: bytes, peer_name: str, cluster: str, links: tuple[str, ...]):
        self.my_boot = my_boot
        self.peer_name = peer_name
        self.cluster = cluster
        self.links = links
        self.current_boot: bytes | None = None
        self.heard_boot: bytes | None = None  # what we echo as peer_boot
        self.last_seq: dict[str, int] = {}
        self.retired: deque[bytes] = deque(maxlen=MAX_RETIRED_BOOTS)

    def check(self, fields: dict, arrived_on: str) -> Verdict:
        if fields["cluster"] != self.cluster:
            return Verdict(False, f"packet for cluster {fields['cluster']!r}")
        if fields["node"] != self.peer_name:
            return Verdict(False, f"packet from unknown node {fields['node']!r}")
        if fields["link"] != arrived_on:
            return Verdict(
                False, f"packet sent on link {fields['link']!r} arrived on {arrived_on!r} (replayed?)"
            )
        boot, seq = fields["boot"], fields["seq"]
        if boot in self.retired:
            return Verdict(False, "packet from a retired boot of the peer (replayed)")
        # Echo the newest boot we hear, so a restarted peer proves itself within one round
        # (waiting for the old boot to time out first would look like a dead peer).
        self.heard_boot = boot
        if boot == self.current_boot:
            last = self.last_seq.get(arrived_on, -1)
            if seq <= last:
                return Verdict(False, f"replayed or reordered packet (seq {seq} <= {last})")
            self.last_seq[arrived_on] = seq
            return Verdict(True)
        if fields["peer_boot"] != self.my_boot:
            return Verdict(False, "new peer boot not yet confirmed (it has not echoed our boot id)")
        if self.current_boot is not None:
            self.retired.append(self.current_boot)
        self.current_boot = boot
        self.last_seq = {arrived_on: seq}
        return Verdict(True, new_boot=True)

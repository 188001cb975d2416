"""hawrap: the two-node failover wrapper around the ``mirror`` engine.

Heartbeats over every link, a link monitor, a pure state machine implementing the fault
table of docs/DESIGN.md, idempotent resources (virtual IP, services, mirror direction) and
notifications.  hawrap drives ``mirror`` through its public API and CLI; it never copies
files itself.
"""

__version__ = "0.1.0"

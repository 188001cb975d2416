"""Every error hawrap raises on purpose, with the exit code ``hawrap`` maps it to.

Messages are written for the administrator: what went wrong, where, what to do.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but the cluster did not do what was asked (e.g. failover refused)
EXIT_ERROR = 2  # bad usage, bad configuration, I/O error
EXIT_NOT_RUNNING = 3  # no hawrap daemon answers on this node
EXIT_NOBODY_SERVES = 4  # hawrap standby: this node stands by, and no node serves


class HawrapError(Exception):
    """Base class: something the administrator can act on.  ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_ERROR


class ConfigError(HawrapError):
    """The configuration file is invalid; the message names the file and the key."""


class NotRunning(HawrapError):
    """No hawrap daemon answers on the control socket of this node."""

    exit_code = EXIT_NOT_RUNNING


class Refused(HawrapError):
    """The daemon refused a command (the message says why: peer not ready, LAN unhealthy, ...)."""

    exit_code = EXIT_FAILED


class ResourceError(HawrapError):
    """A resource action (start, stop, monitor) failed; the message carries the OCF meaning."""

    def __init__(self, message: str, ocf_code: int | None = None):
        super().__init__(message)
        self.ocf_code = ocf_code


class WireError(HawrapError):
    """A heartbeat packet is malformed, too large, or fails authentication; it is dropped."""


class WireAuthError(WireError):
    """A heartbeat packet whose MAC is not the shared secret's: another secret, or forged."""

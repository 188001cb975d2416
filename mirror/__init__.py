"""hamirror's mirroring engine: scan, compare, delta-transfer and verify directory trees.

The public library API (documented in the README's "Library API"):

- ``sync(src, dst, **options) -> SyncResult``: mirror a tree (local, ``mirror://``, ``HOST:PATH``);
- ``Receiver``, ``ModuleConfig``, ``StreamTransport``: embed a receiver;
- ``MirrorServer``: what ``mirror serve`` runs;
- ``compare_trees``, ``TreeScan``: what ``mirror diff`` runs;
- ``configure_logging(who, verbose, quiet)``: log lines for the journal (priorities) or a terminal;
- ``read_secret_file(path)``: a shared secret, by the strict-modes rule every command uses;
- the errors of ``mirror.errors``.

Names are imported on first use, so ``import mirror`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "sync": "mirror.transfer",
    "SyncResult": "mirror.transfer",
    "Receiver": "mirror.receiver",
    "ModuleConfig": "mirror.receiver",
    "StreamTransport": "mirror.protocol",
    "MirrorServer": "mirror.server",
    "compare_trees": "mirror.compare",
    "Difference": "mirror.compare",
    "CompareOptions": "mirror.compare",
    "TreeScan": "mirror.treescan",
    "MirrorError": "mirror.errors",
    "LockedError": "mirror.errors",
    "StaleEpochError": "mirror.errors",
    "AuthError": "mirror.errors",
    "ProtocolError": "mirror.errors",
    "UsageError": "mirror.errors",
    "read_secret_file": "mirror.secretfile",
    "SecretFileError": "mirror.secretfile",
    "configure_logging": "mirror.logsetup",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mirror' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

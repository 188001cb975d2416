"""A connection to an etcd cluster through its JSON gateway, with etcd3gw.

etcd3gw talks to one endpoint; a cluster member must survive the loss of any one etcd
member, so ``EtcdClient`` holds one etcd3gw client per endpoint and moves to the next
endpoint when one does not answer.  It adds what etcd3gw leaves to its caller: a deadline
per request (a request never outlives the time its caller has left, which is what the
quorum watchdog relies on), etcd's user/password authentication (the token is sent in the
``Authorization`` header and fetched again when etcd says it expired) and TLS through the
same options etcdctl takes.

Each thread that talks to etcd makes its own ``EtcdClient``: etcd3gw sets the timeout on
the client object, and a ``requests`` session is not meant to be shared across threads.
Requires etcd 3.4 or later (the ``/v3/`` gateway path).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, HawrapError

log = logging.getLogger(__name__)

API_PATH = "/v3/"
# etcd's gateway answers these when the member cannot reach its leader or is not ready:
# worth trying another member.  Anything else (bad request, permission denied) is not.
_RETRY_REASONS = ("Bad Gateway",)  # the status codes etcd3gw does not map to an exception of its own
_AUTH_EXPIRED = ("invalid auth token", "user name is empty", "auth: revision in header is old")


class EtcdError(HawrapError):
    """etcd refused a request (bad request, permission denied, authentication failed)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time: this node cannot reach an etcd quorum right now."""


@dataclass(frozen=True)
class EtcdConnection:
    """How to reach the cluster: endpoints (``http://host:2379`` or ``https://...``), TLS
    files as etcdctl names them (``--cacert``, ``--cert``, ``--key``), and a user whose
    password is read from a file (never from the configuration itself)."""

    endpoints: tuple[str, ...]
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password_file: str | None = None
    request_timeout: float = 0.5

    def check(self, where: str = "etcd") -> None:
        """Raise ConfigError naming the key for anything etcd3gw would only trip over later."""
        if not self.endpoints:
            raise ConfigError(f"{where}.endpoints: at least one endpoint is required")
        for i, url in enumerate(self.endpoints):
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
                raise ConfigError(
                    f"{where}.endpoints[{i}]: {url!r} is not http://HOST:PORT or https://HOST:PORT"
                )
            try:
                port = parsed.port
            except ValueError:
                port = -1
            if port == -1 or port == 0:
                raise ConfigError(f"{where}.endpoints[{i}]: {url!r} has an invalid port")
            if parsed.scheme == "http" and (self.ca_file or self.cert_file):
                raise ConfigError(
                    f"{where}.endpoints[{i}]: {url!r} is plain http but TLS files are configured"
                )
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(
                f"{where}.cert_file and {where}.key_file go together (a client certificate and its key)"
            )
        if (self.user is None) != (self.password_file is None):
            raise ConfigError(f"{where}.user and {where}.password_file go together")
        for key in ("ca_file", "cert_file", "key_file", "password_file"):
            value = getattr(self, key)
            if value is not None:
                try:
                    with open(value, "rb"):
                        pass
                except OSError as exc:
                    raise ConfigError(f"{where}.{key}: cannot read {value}: {exc.strerror}") from None
        if not self.request_timeout > 0:
            raise ConfigError(f"{where}.request_timeout must be greater than 0")

    def password(self) -> str:
        assert self.password_file is not None
        with open(self.password_file, encoding="utf-8") as f:
            # one line; a trailing newline from `echo > file` is not part of the password
            return f.read(4097).rstrip("\r\n")


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with ``prefix`` (etcd's convention)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


# ---------------------------------------------------------------- transaction pieces


def put_op(key: str, value: bytes, lease: int = 0) -> dict:
    op: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        op["lease"] = str(lease)
    return {"request_put": op}


def range_op(key: str, prefix: bool = False) -> dict:
    op = {"key": b64(key)}
    if prefix:
        op["range_end"] = b64(prefix_end(key))
    return {"request_range": op}


def delete_op(key: str) -> dict:
    return {"request_delete_range": {"key": b64(key)}}


def compare(key: str, target: str, result: str, value: int | bytes, prefix: bool = False) -> dict:
    """``target``: CREATE, MOD, VERSION, VALUE or LEASE; ``result``: EQUAL, LESS, GREATER, NOT_EQUAL."""
    field = {
        "CREATE": "create_revision",
        "MOD": "mod_revision",
        "VERSION": "version",
        "VALUE": "value",
        "LEASE": "lease",
    }[target]
    c: dict[str, Any] = {"key": b64(key), "target": target, "result": result}
    c[field] = b64(value) if isinstance(value, bytes) else str(value)
    if prefix:
        c["range_end"] = b64(prefix_end(key))
    return c


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def key_values(response: dict) -> list[KeyValue]:
    """The ``kvs`` of a range response (etcd's JSON leaves out zero fields and sends int64 as text)."""
    out = []
    for kv in response.get("kvs", ()):
        out.append(
            KeyValue(
                key=unb64(kv["key"]).decode(errors="replace"),
                value=unb64(kv.get("value", "")),
                create_revision=int(kv.get("create_revision", 0)),
                mod_revision=int(kv.get("mod_revision", 0)),
                lease=int(kv.get("lease", 0)),
            )
        )
    return out


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction (the revision of its writes if it wrote)
    responses: list[dict]

    def ranges(self) -> list[list[KeyValue]]:
        return [key_values(r.get("response_range", {})) for r in self.responses]


# ---------------------------------------------------------------- the client


class EtcdClient:
    def __init__(self, conn: EtcdConnection):
        try:  # the optional extra hamirror[etcd]: imported here so that two-node mode never needs it
            import etcd3gw
            import requests
        except ImportError as exc:
            raise EtcdError(
                f"the etcd backend needs the optional extra: pip install 'hamirror[etcd]' ({exc})"
            ) from None

        self.conn = conn
        self._clients = []
        for url in conn.endpoints:
            parsed = urllib.parse.urlsplit(url)
            client = etcd3gw.Etcd3Client(
                host=parsed.hostname,
                port=parsed.port or 2379,
                protocol=parsed.scheme,
                ca_cert=conn.ca_file,
                cert_key=conn.key_file,
                cert_cert=conn.cert_file,
                timeout=conn.request_timeout,
                api_path=API_PATH,
            )
            # The configuration alone says how to reach etcd: requests would otherwise let
            # REQUESTS_CA_BUNDLE override the configured CA, and send etcd traffic through a
            # proxy named in the environment.
            client.session.trust_env = False
            self._clients.append((url, client))
        self._current = 0
        self._exceptions = etcd3gw.exceptions
        self._request_error = requests.RequestException

    @property
    def endpoint(self) -> str:
        return self._clients[self._current][0]

    def close(self) -> None:
        for _, client in self._clients:
            client.session.close()

    # ------------------------------------------------------------ requests

    def call(self, path: str, body: dict, deadline: float | None = None) -> dict:
        """POST ``body`` to the gateway's ``path`` on the current endpoint, moving on to the
        next one when it does not answer, until each endpoint was tried once or ``deadline``
        (monotonic) passes.  Raises EtcdUnavailable or EtcdError."""
        failures = []
        for _ in range(len(self._clients)):
            url, client = self._clients[self._current]
            timeout = self.conn.request_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0.001:
                    failures.append("deadline reached")
                    break
            try:
                return self._post(client, path, body, timeout)
            except self._exceptions.Etcd3Exception as exc:
                detail = _detail(exc)
                if not _retryable(exc, detail):
                    raise EtcdError(f"etcd {url} refused {path}: {detail}") from None
                failures.append(f"{url}: {detail}")
            except self._request_error as exc:  # what etcd3gw lets through (e.g. a reply cut short)
                failures.append(f"{url}: {type(exc).__name__}: {exc}")
            self._current = (self._current + 1) % len(self._clients)
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: {'; '.join(failures)}")

    def _post(self, client, path: str, body: dict, timeout: float) -> dict:
        client.timeout = timeout
        url = client.base_url + API_PATH + path.lstrip("/")
        if self.conn.user and "Authorization" not in client.session.headers:
            self._authenticate(client, timeout)
        try:
            return client.post(url, data=json.dumps(body))
        except self._exceptions.Etcd3Exception as exc:
            if not (self.conn.user and any(m in _detail(exc) for m in _AUTH_EXPIRED)):
                raise
        # the token expired (etcd's --auth-token-ttl) or the member restarted: once more
        self._authenticate(client, timeout)
        return client.post(url, data=json.dumps(body))

    def _authenticate(self, client, timeout: float) -> None:
        client.session.headers.pop("Authorization", None)
        client.timeout = timeout
        try:
            reply = client.post(
                client.base_url + API_PATH + "auth/authenticate",
                json={"name": self.conn.user, "password": self.conn.password()},
            )
        except self._exceptions.Etcd3Exception as exc:
            detail = _detail(exc)
            if _retryable(exc, detail):
                raise
            raise EtcdError(
                f"etcd {client.base_url}: authentication as {self.conn.user!r} failed: {detail}"
            ) from None
        except OSError as exc:
            raise EtcdError(
                f"etcd: cannot read the password file {self.conn.password_file}: {exc.strerror}"
            ) from None
        client.session.headers["Authorization"] = reply["token"]

    # ------------------------------------------------------------ the calls hawrap makes

    def txn(
        self,
        compares: list[dict],
        success: list[dict],
        failure: list[dict] | None = None,
        deadline: float | None = None,
    ) -> TxnResult:
        reply = self.call(
            "kv/txn", {"compare": compares, "success": success, "failure": failure or []}, deadline
        )
        return TxnResult(
            bool(reply.get("succeeded", False)), int(reply["header"]["revision"]), reply.get("responses", [])
        )

    def read(self, *ops: dict, deadline: float | None = None) -> TxnResult:
        """Several ranges at one revision, linearizable (one round trip through the leader)."""
        return self.txn([], list(ops), deadline=deadline)

    def grant(self, ttl: int, deadline: float | None = None) -> tuple[int, int]:
        """A new lease: (id, the TTL etcd granted, which may be more than asked)."""
        reply = self.call("lease/grant", {"TTL": ttl, "ID": 0}, deadline)
        if reply.get("error"):
            raise EtcdError(f"etcd refused a lease of {ttl} s: {reply['error']}")
        return int(reply["ID"]), int(reply["TTL"])

    def keepalive(self, lease: int, deadline: float | None = None) -> int:
        """Renew ``lease``; the TTL it was renewed to, or -1 if it had already expired."""
        reply = self.call("lease/keepalive", {"ID": str(lease)}, deadline)
        return int(reply.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int, deadline: float | None = None) -> None:
        try:
            self.call("kv/lease/revoke", {"ID": str(lease)}, deadline)
        except EtcdError as exc:
            if "requested lease not found" not in str(exc):
                raise

    def endpoint_status(self) -> list[dict]:
        """Each endpoint on its own: reachable, its member id, who it thinks leads, raft term."""
        out = []
        for url, client in self._clients:
            try:
                st = self._post(client, "maintenance/status", {}, self.conn.request_timeout)
                out.append({"endpoint": url, "ok": True, "member": st["header"]["member_id"], "leader": st.get("leader"),
                            "raft_term": int(st.get("raftTerm", 0)), "version": st.get("version")})  # fmt: skip
            except self._exceptions.Etcd3Exception as exc:
                out.append({"endpoint": url, "ok": False, "error": _detail(exc)})
            except EtcdError as exc:
                out.append({"endpoint": url, "ok": False, "error": str(exc)})
        return out


def _detail(exc: Exception) -> str:
    text = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            text = parsed.get("message") or parsed.get("error") or text
    except ValueError:
        pass
    return str(text).strip()[:300]


def _retryable(exc: Exception, detail: str) -> bool:
    import etcd3gw.exceptions as e

    if isinstance(exc, e.ConnectionFailedError | e.ConnectionTimeoutError | e.InternalServerError):
        return True
    reason = " ".join(str(a) for a in exc.args)
    return reason in _RETRY_REASONS or "etcdserver: request timed out" in detail or "no leader" in detail

"""Joining an existing Ray cluster by address (`--ray-address HOST:PORT`).

Ray 2.60 turns token authentication on for a cluster that `ray start --head` starts on a machine holding a token
(any machine that has run a local Ray: it writes ~/.ray/auth_token). A driver that joins with `address="auto"`
switches to token mode itself when it finds a token, but one that joins by explicit address does not: it connects
without the token and retries for about 20 s before failing. `prepare_connection` makes the explicit form behave
like "auto"; `connection_hint` says what to set when joining fails anyway.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

# Read by Ray when it is first imported: "0" keeps a loopback address loopback (otherwise Ray 2.x maps 127.0.0.1 to
# the machine's routable address and the driver dials that, where a head bound to 127.0.0.1 does not listen).
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Addresses Ray resolves itself: a private local Ray, or the cluster this machine is part of.
_RAY_RESOLVED = (None, "", "local", "auto")


def default_token_path() -> Path:
    """Where `ray get-auth-token --generate` and a local Ray write the token."""
    return Path.home() / ".ray" / "auth_token"


def token_source(environ: os._Environ | dict | None = None) -> str | None:
    """Where Ray would read this machine's authentication token from, in Ray's order; None when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV, "").strip():
        return f"${TOKEN_ENV}"
    if environ.get(TOKEN_PATH_ENV):
        path = Path(environ[TOKEN_PATH_ENV]).expanduser()
        return str(path) if path.is_file() else None
    path = default_token_path()
    return str(path) if path.is_file() else None


def _host(address: str) -> str:
    address = address.split("://", 1)[-1]
    if address.startswith("["):                      # [::1]:6379
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_loopback_address(address: str) -> bool:
    """Whether a host, `host:port`, `[v6]:port` or `ray://host:port` names this machine's loopback interface."""
    host = _host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_connection(address: str | None) -> str | None:
    """Set up this process to join the cluster at `address`; call before Ray is imported. Returns the token
    source when token mode was switched on here.

    An explicit RAY_AUTH_MODE is respected. A token sent to a cluster without authentication is ignored by it,
    so switching to token mode whenever a token exists cannot lock this driver out of any cluster."""
    if address in _RAY_RESOLVED:
        return None
    if is_loopback_address(address):
        os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return None
    source = token_source()
    if source is None:
        return None
    os.environ[AUTH_MODE_ENV] = "token"
    if "ray" in sys.modules:
        # Ray caches the mode when it is imported; its own "auto" path refreshes it the same way.
        from ray._raylet import Config

        Config.initialize("")
    return source


def connection_hint(address: str | None) -> str:
    """What to add to a failure to join `address`: where the token goes, when this process sent none."""
    if address in _RAY_RESOLVED or os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
        return ""
    return (f"; if the cluster uses token authentication (Ray's default for `ray start` on a machine with a token), "
            f"put its token in {default_token_path()}, or set {TOKEN_PATH_ENV}=FILE or {TOKEN_ENV}=TOKEN")

"""Who may reach the server and call what: loopback by default, and the admin key that the restricted
Triton APIs (shared-memory registration, logging, trace, model repository) require. See docs/security.md."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
"""Where every endpoint listens unless told otherwise: this host only."""

ADMIN_KEY_ENV_VAR = "DISTRIFUSION_ADMIN_KEY"
"""Environment variable holding the admin key (when no key or key file is given)."""
ADMIN_KEY_NAME = "distrifusion-admin-key"
ADMIN_HTTP_HEADER = ADMIN_KEY_NAME
"""HTTP header a restricted call must carry, with the admin key as its value."""
ADMIN_GRPC_HEADER = "triton-grpc-protocol-" + ADMIN_KEY_NAME
"""gRPC metadata key a restricted call must carry (Triton prefixes the configured key this way)."""
RESTRICTED_APIS = ("shared-memory", "logging", "trace", "model-repository")
"""Restricted by default: what a client of the pipeline never needs (and what can break or read the
server: shared-memory registration, logging and trace settings, model load/unload)."""
OPEN_APIS = ("health", "metadata", "inference", "model-config", "statistics")
"""Always open: what clients and perf_analyzer use."""
_ADMIN_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]{16,256}")



def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address tritonserver binds to) is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("ipv6:").strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str:
    return (f"listening on {host}: the HTTP, gRPC and metrics endpoints are reachable from other hosts; "
            "put TLS and authentication in front of them (see docs/security.md)")


def check_admin_key(key: str) -> str:
    """``key`` if it can be an admin key (16 to 256 characters of ``A-Za-z0-9._~+/-``), else ValueError."""
    if not _ADMIN_KEY_PATTERN.fullmatch(key):
        raise ValueError("the admin key must be 16 to 256 characters from A-Z a-z 0-9 . _ ~ + / - "
                         f"(got {len(key)} characters)")
    return key


def resolve_admin_key(key: str | None = None, key_file: Path | str | None = None,
                      environ: dict | None = None) -> tuple[str, str]:
    """The admin key and where it came from: ``key``, else the first line of ``key_file``, else
    :data:`ADMIN_KEY_ENV_VAR`, else a random key (known to this process only). ValueError if unusable."""
    environ = os.environ if environ is None else environ
    if key is not None:
        return check_admin_key(key), "given"
    if key_file is not None:
        lines = Path(key_file).read_text().splitlines()
        return check_admin_key(lines[0].strip() if lines else ""), f"file {key_file}"
    if environ.get(ADMIN_KEY_ENV_VAR):
        return check_admin_key(environ[ADMIN_KEY_ENV_VAR].strip()), f"${ADMIN_KEY_ENV_VAR}"
    return secrets.token_urlsafe(32), "random"

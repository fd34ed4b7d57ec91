"""Where a service listens: loopback is private to the machine, anything else is reachable by others."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_bind_refusal(host: str, protected: bool, without: str, exposure: str, remedy: str) -> str | None:
    """Why a service must not listen on `host`, or None: an unprotected service serves loopback only."""
    if protected or is_loopback(host):
        return None
    return f"refusing to listen on {host} without {without}: anyone who reaches it could {exposure}; {remedy}"

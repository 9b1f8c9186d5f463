"""The SSRF guard: outbound notifications never reach addresses inside the network.

A URL is refused when its host is, or resolves to, a loopback, private, link-local (cloud
metadata at 169.254.169.254 included), shared, multicast, reserved or unspecified address; every
address a name resolves to is checked, not only the first. ``allow`` lists networks let through
anyway (``127.0.0.0/8`` for local development and tests). The check is made when an endpoint is
registered, for a clear ``422``, and again on every connection: the connection goes to the very
address that was checked, so a name that changes its answer in between (DNS rebinding) gains
nothing. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from errands.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL_LENGTH = 2048


class Refused(Exception):
    """The URL or the address it leads to may not be called."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"127.0.0.0/8, ::1"`` as networks (the value of ``ERRANDS_NOTIFY_ALLOW_NETWORKS``)."""
    networks = []
    for part in text.split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"'{part.strip()}' is not a network (such as 127.0.0.0/8).") from None
    return tuple(networks)


class AddressPolicy:
    """Which URLs and addresses outbound notifications may use."""

    def __init__(self, *, allow: Sequence[IPNetwork] = (), https_only: bool = False) -> None:
        self.allow = tuple(allow)
        self.https_only = https_only

    def check_url(self, url: str) -> tuple[str, str, int]:
        """``(scheme, host, port)`` of an acceptable URL; :class:`Refused` with the reason if not."""
        if len(url) > MAX_URL_LENGTH:
            raise Refused(f"The URL is longer than {MAX_URL_LENGTH} characters.")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise Refused("The URL is not valid.") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused("The URL must start with http:// or https://.")
        if self.https_only and scheme != "https":
            raise Refused("Only https:// URLs are allowed here.")
        if parts.username is not None or parts.password is not None:
            raise Refused("The URL may not carry credentials; receivers check the signature.")
        host = parts.hostname
        if not host:
            raise Refused("The URL has no host.")
        literal = _literal(host)
        if literal is not None:
            self.check_address(literal)
        return scheme, host, port or (443 if scheme == "https" else 80)

    def check_address(self, address: IPAddress) -> None:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allow):
            return
        if not address.is_global or address.is_multicast:
            raise Refused(f"The URL leads to {address}, an address inside the network, which is not allowed.")

    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address of ``host``, each checked; :class:`Refused` if any is not allowed."""
        literal = _literal(host)
        if literal is not None:
            self.check_address(literal)
            return [str(literal)]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise LookupError(f"The name {host} could not be resolved.") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise LookupError(f"The name {host} has no address.")
        for address in addresses:
            self.check_address(ipaddress.ip_address(address.split("%", 1)[0]))
        return addresses

    async def check(self, url: str) -> None:
        """Refuse ``url`` now, resolving its name, if it cannot be called."""
        _, host, port = self.check_url(url)
        await self.resolve(host, port)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None

"""The SSRF guard: outbound notifications never reach addresses inside the network.

A URL is refused when its host is, or resolves to, a loopback, private, link-local (cloud
metadata at 169.254.169.254 included), shared, multicast, reserved, documentation or unspecified
address; every address a name resolves to is checked, not only the first. An IPv6 address that
carries an IPv4 address (IPv4-mapped, -compatible and -translated, 6to4, NAT64's well-known
prefix, Teredo) is judged by the IPv4 address it carries. A host written as a number in one of
the legacy forms some resolvers take (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``)
is refused whatever it stands for: HTTP libraries disagree on what such a host means. The name
``localhost`` (and every name under ``.localhost``) stands for the loopback addresses.

``allow`` lists networks let through anyway (``127.0.0.0/8`` for local development and tests).
The check is made when an endpoint is registered and when a task is submitted with a
``notify_url``, for a clear ``422``, and again on every connection: the connection goes to the
very address that was checked, so a name that changes its answer in between (DNS rebinding)
gains nothing. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from errands.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048
#: How long a check at registration or submission may wait for the name to resolve.
RESOLVE_TIMEOUT_S = 5.0

#: Special-purpose networks that are not globally reachable and that the ``ipaddress`` module
#: of some Python versions still calls global (IANA's special-purpose registries).
_NOT_GLOBAL = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4",
        "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16",
        "fc00::/7", "fe80::/10", "fec0::/10",
    )
)  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
#: A host made only of numbers, dots and hex prefixes: an IPv4 address in some notation.
_NUMERIC_HOST = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+))*\.?$", re.IGNORECASE)


class Refused(Exception):
    """The URL or the address it leads to may not be called."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def carried(address: IPAddress) -> list[IPAddress]:
    """The addresses a packet to ``address`` really goes to: the IPv4 addresses an IPv6 address
    embeds (any of them may be where it ends up), else the address itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    n = int(address)
    if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return [address.ipv4_mapped]
    if n >> 32 == 0xFFFF_0000:  # ::ffff:0:a.b.c.d, IPv4-translated
        return [ipaddress.IPv4Address(n & 0xFFFF_FFFF)]
    if n >> 32 == 0 and n > 1:  # ::a.b.c.d, IPv4-compatible (:: and ::1 are themselves)
        return [ipaddress.IPv4Address(n & 0xFFFF_FFFF)]
    if address in _NAT64:  # 64:ff9b::a.b.c.d
        return [ipaddress.IPv4Address(n & 0xFFFF_FFFF)]
    if address.sixtofour is not None:  # 2002:aabb:ccdd::/48
        return [address.sixtofour]
    if address.teredo is not None:  # 2001::/32: the server and the client's public address
        return list(address.teredo)
    return [address]


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is globally reachable (by IANA's registries and the OS's module)."""
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return False
    return not (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_unspecified
        or any(address in network for network in _NOT_GLOBAL if network.version == address.version)
    )


class AddressPolicy:
    """Which URLs and addresses outbound notifications may use."""

    def __init__(self, *, allow: Sequence[IPNetwork] = (), https_only: bool = False) -> None:
        self.allow = tuple(allow)
        self.https_only = https_only

    def check_url(self, url: str) -> tuple[str, str, int]:
        """``(scheme, host, port)`` of an acceptable URL; :class:`Refused` with the reason if not.

        Literal addresses are judged here; names are judged by :meth:`resolve`."""
        if len(url) > MAX_URL_LENGTH:
            raise Refused(f"The URL is longer than {MAX_URL_LENGTH} characters.")
        if any(ord(c) < 0x21 or c == "\x7f" for c in url):
            raise Refused("The URL may not contain spaces or control characters.")
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
        elif _NUMERIC_HOST.match(host):
            raise Refused("Write an IPv4 address in the URL as four decimal numbers (such as 192.0.2.10).")
        else:
            for address in _named(host):
                self.check_address(address)
        return scheme, host, port or (443 if scheme == "https" else 80)

    def check_address(self, address: IPAddress) -> None:
        for inner in carried(address):
            if any(inner in network for network in self.allow):
                continue
            if not is_public(inner):
                shown = address if inner == address else f"{address} (that is, {inner})"
                raise Refused(
                    f"The URL leads to {shown}, an address inside the network, which is not allowed "
                    "(ERRANDS_NOTIFY_ALLOW_NETWORKS lets chosen networks through)."
                )

    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address of ``host``, each checked; :class:`Refused` if any is not allowed."""
        literal = _literal(host)
        if literal is not None:
            self.check_address(literal)
            return [str(literal)]
        if _NUMERIC_HOST.match(host):
            raise Refused("Write an IPv4 address in the URL as four decimal numbers (such as 192.0.2.10).")
        named = _named(host)
        if named:
            for known in named:
                self.check_address(known)
            return [str(a) for a in named]
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
        """Refuse ``url`` now, resolving its name, if it cannot be called (:class:`Refused`, or
        :class:`LookupError` when the name does not resolve in time)."""
        _, host, port = self.check_url(url)
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                await self.resolve(host, port)
        except TimeoutError:
            raise LookupError(f"The name {host} did not resolve within {RESOLVE_TIMEOUT_S:g} s.") from None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _named(host: str) -> tuple[IPAddress, ...]:
    """The addresses a special-use name stands for without asking DNS (RFC 6761)."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name == "localhost.localdomain":
        return _LOCALHOST
    return ()

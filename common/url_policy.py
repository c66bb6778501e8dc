"""Which URLs the service may fetch: http(s) to public addresses only, unless an operator
allowlists a private host. Shared by the API (refuse at submission) and the CPU workers (check
again at every hop, and connect only to the address that was checked)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from common.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[IPAddress]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedUrl(InvalidRequest):
    code = "blocked_url"


def system_resolver(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedUrl(f"cannot resolve {host!r}: {exc.strerror}") from None
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host names literally, in any form a resolver would accept
    (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``[::1]``)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """IPv4 addresses hidden inside IPv6 forms that still reach the IPv4 host."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return is_public(embedded)
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class Target:
    """A URL taken apart, with the one address the connection must go to."""

    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress


@dataclass(frozen=True)
class UrlPolicy:
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    resolver: Resolver = system_resolver

    @classmethod
    def from_allowlist(cls, entries: Iterable[str], resolver: Resolver = system_resolver) -> UrlPolicy:
        hosts, networks = set(), []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower())
        return cls(frozenset(hosts), tuple(networks), resolver)

    def _allowed(self, host: str, address: IPAddress) -> bool:
        if host in self.allow_hosts or any(address in network for network in self.allow_networks):
            return True
        return is_public(address)

    def check(self, url: str) -> Target:
        """Resolve once and check every address; raise ``BlockedUrl`` (a 400) otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BlockedUrl(f"malformed URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in {"http", "https"}:
            raise BlockedUrl(f"scheme {scheme or 'none'!r} is not allowed; use http or https")
        host = (parts.hostname or "").lower()
        if not host:
            raise BlockedUrl("the URL has no host")
        if parts.username or parts.password:
            raise BlockedUrl("credentials in URLs are not allowed")
        port = port or (443 if scheme == "https" else 80)
        literal = _ip_literal(host)
        addresses = [literal] if literal is not None else self.resolver(host, port)
        if not addresses:
            raise BlockedUrl(f"{host!r} resolves to no address")
        # Every address must pass: a name with one public and one private address is refused,
        # since the connection could land on either.
        refused = [str(a) for a in addresses if not self._allowed(host, a)]
        if refused:
            raise BlockedUrl(f"{host!r} resolves to a non-public address ({', '.join(refused)})")
        return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0])

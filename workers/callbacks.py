"""Which callback URLs a job may name: the policy, apart from delivery (`workers.webhooks`) and queueing
(`workers.celery_app`).

The API checks the URL when the job is submitted (`check_callback`); delivery checks it again after
resolving the host (`resolve_target`) and connects to the very address it checked. Hosts are read as a
resolver would read them: `0x7f000001`, `2130706433`, `127.1` and `0177.0.0.1` are all 127.0.0.1
(inet_aton), and an IPv6 address that carries an IPv4 one (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
`::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) is judged as that IPv4 address, and delivery connects to that
IPv4 address itself.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from eigenshift_core.errors import InputError
from workers.settings import Settings

SCHEMES = {"http": 80, "https": 443}
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: the last 32 bits are IPv4
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d, still routed as IPv4 by some stacks
INET_ATON_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")  # hex, octal or decimal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


class Refused(Exception):
    """The callback's host resolves to an address the allowlist does not permit."""


def inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a resolver reads in `host` with inet_aton's rules (1 to 4 dot-separated numbers,
    each decimal, 0x-hex or 0-octal, the last filling the bytes left), or None when it is no such number."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(INET_ATON_PART.match(part) for part in parts):
        return None
    values = [int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8) if p[0] == "0" else int(p)
              for p in parts]
    *head, last = values
    if any(value > 255 for value in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for value in head:
        number = number * 256 + value
    return ipaddress.IPv4Address(number * 256 ** (4 - len(head)) + last)


def parse_address(host: str) -> IPAddress | None:
    """The address `host` (no brackets) names, in any spelling a resolver accepts; None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return inet_aton(host)


def judged_address(address: IPAddress) -> IPAddress:
    """The address a connection to `address` reaches: the IPv4 address inside an IPv4-mapped,
    IPv4-compatible or NAT64 IPv6 address, else `address` itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):  # :: and ::1 are IPv6's own
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True)
class Allowlist:
    """`webhook_allowed_hosts`, parsed: exact names, `*.suffix` suffixes, networks (CIDRs or single IPs),
    and `*` for any name or public address."""

    names: frozenset[str]
    suffixes: tuple[str, ...]  # ".example.com" for "*.example.com"
    networks: tuple[IPNetwork, ...]
    any_host: bool

    @classmethod
    def parse(cls, entries: Sequence[str]) -> Allowlist:
        names, suffixes, networks, any_host = set(), [], [], False
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if entry == "*":
                any_host = True
            elif entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError:
                    if not entry or "/" in entry or "*" in entry:
                        raise ValueError(f"webhook_allowed_hosts: {raw!r} is no host name, *.suffix or CIDR") from None
                    names.add(entry)
        return cls(frozenset(names), tuple(suffixes), tuple(networks), any_host)

    @property
    def empty(self) -> bool:
        return not self.names and not self.suffixes and not self.networks and not self.any_host

    def listed(self, address: IPAddress) -> bool:
        """`address`, judged by the IPv4 address it carries, lies in a listed network."""
        judged = judged_address(address)
        return any(judged.version == network.version and judged in network for network in self.networks)

    def allows_name(self, host: str) -> bool:
        return self.any_host or host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)

    def allows_address(self, address: IPAddress) -> bool:
        """A global unicast address passes; any other (loopback, private, link-local, ...) only when listed.
        An IPv6 address carrying an IPv4 one is judged as that IPv4 address."""
        judged = judged_address(address)
        return (judged.is_global and not judged.is_multicast) or self.listed(judged)


@dataclass(frozen=True)
class CallbackTarget:
    """Where a callback goes: scheme, host (lower case, no brackets; an address in its canonical spelling),
    port, and the address when the host is one."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: str
    address: IPAddress | None


def _refuse(message: str) -> InputError:
    return InputError(f"callback_url {message}", field="callback_url")


def check_callback_url(url: str, allowlist: Allowlist) -> CallbackTarget:
    """The target of `url` when its scheme, port and host are allowed (no DNS here: delivery resolves and
    checks again); an `InputError` naming `callback_url` otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise _refuse(f"is not a valid URL: {error}") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in SCHEMES:
        raise _refuse(f"must be http or https, not {scheme or 'no scheme'!r}")
    if not host:
        raise _refuse("names no host")
    if parts.username is not None or parts.password is not None:
        raise _refuse("must not carry credentials (the signature authenticates the service)")
    if allowlist.empty:
        raise _refuse("is refused: callbacks are off (webhook_allowed_hosts is empty)")
    address = parse_address(host)
    # `localhost` always means loopback: judge it as the address it will be.
    judged = address or (ipaddress.ip_address("127.0.0.1") if host == "localhost" or host.endswith(".localhost")
                         else None)
    allowed = allowlist.allows_name(host) if address is None else allowlist.any_host or allowlist.listed(address)
    if not allowed or (judged is not None and not allowlist.allows_address(judged)):
        raise _refuse(f"host {host!r} is not an allowed callback host (webhook_allowed_hosts)")
    if address is not None:  # connect to what was checked: `127.1` and `[64:ff9b::7f00:1]` are 127.0.0.1
        address = judged_address(address)
        host = str(address)
    netloc = f"[{host}]" if address is not None and address.version == 6 else host
    default = SCHEMES[scheme]
    return CallbackTarget(scheme, host, port or default, urlunsplit(("", "", parts.path or "/", parts.query, "")),
                          netloc if port in (None, default) else f"{netloc}:{port}", address)


def check_callback(url: str | None, settings: Settings) -> None:
    """Refuse (422 naming `callback_url`) a callback URL the settings do not allow; nothing when none given."""
    if url is not None:
        check_callback_url(url, Allowlist.parse(settings.webhook_allowed_hosts))


def system_resolver(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def resolve_target(target: CallbackTarget, allowlist: Allowlist, resolve: Resolver = system_resolver) -> IPAddress:
    """The address to connect to. Every address the host resolves to must be allowed, not just the first:
    the one connected to is the one checked."""
    if target.address is not None:
        addresses: list[IPAddress] = [target.address]
    else:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(target.host, target.port)]
        except ValueError as error:
            raise Refused(f"{target.host!r} resolved to an unreadable address: {error}") from None
    refused = [str(a) for a in addresses if not allowlist.allows_address(a)]
    if not addresses or refused:
        raise Refused(f"{target.host!r} resolves to {', '.join(refused) or 'nothing'}, not an allowed address")
    return judged_address(addresses[0])  # an IPv4 address inside IPv6 was judged as IPv4: connect to that

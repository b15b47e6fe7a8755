"""Which Host names the HTTP port answers (setting `http_allowed_hosts`): the guard against DNS rebinding.

A web page a user opens can point its own host name at 127.0.0.1 (DNS rebinding) and then have the browser send
requests to a server on the user's machine: same-origin for the browser, so the page reads every answer. The
requests still carry the page's host name in `Host`, so a server that answers only the names it is known by is
out of the page's reach. As Starlette's TrustedHostMiddleware (`*`, `*.suffix`, exact names) and Jupyter's
check_host (by default loopback names and addresses only) do; we write the few lines ourselves because the rule
must run in three places that are not all Starlette apps (the access middleware, the infer path answered inside
the HTTP protocol, and the `--http-workers` front ends).

Default (no setting): a server bound to a loopback address answers only `localhost`, `*.localhost` and loopback
addresses (and the bound address); bound to any other address, every Host. Loopback names are always answered
(kubectl port-forward, SSH tunnels, probes run inside the pod): a page on the Internet cannot make a browser send
them, since browsers and resolvers keep `localhost` for the machine itself (RFC 6761 §6.3).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from service.errors import InvalidInput, MisdirectedRequest, ServingError

ANY = "*"
_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")  # a host name, lowercased (no port, no trailing dot)
_PORT = re.compile(r"^[0-9]{0,5}$")  # RFC 9110 §4.1: port = *DIGIT (at most 65535: checked in host_name)
_SEEN_MAX = 256  # Host values remembered with their verdict (clients send the same one every time)
_SETTING = "setting http_allowed_hosts, flag --http-allowed-hosts; '*' answers any Host"


def is_loopback(host: str) -> bool:
    """`localhost` (or a name under it) or a loopback address, bracketed or not."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a host name: assume it resolves beyond this machine
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _canonical(name: str) -> str | None:
    """A host name lowercased without its trailing dot, or an IP address in its compressed form; None when
    `name` is neither."""
    name = name.lower()
    try:
        return str(ipaddress.ip_address(name.strip("[]") if name.startswith("[") else name))
    except ValueError:
        pass
    name = name[:-1] if name.endswith(".") else name
    return name if _NAME.match(name) else None


def host_name(value: bytes) -> str | None:
    """The name (or address) of a Host header value, without its port; None when the value is malformed."""
    text = value.decode("latin-1").strip()
    if text.startswith("["):  # an IPv6 literal, with or without a port: "[::1]:8000"
        addr, _, rest = text[1:].partition("]")
        if rest and not (rest.startswith(":") and _PORT.match(rest[1:])):
            return None
        return _canonical(f"[{addr}]") if ":" in addr else None
    name, sep, port = text.rpartition(":")
    if not sep:
        name = text
    elif not _valid_port(port):
        return None
    return _canonical(name)


def _valid_port(port: str) -> bool:
    return bool(_PORT.match(port)) and (not port or int(port) <= 65535)


def several_hosts(count: int) -> InvalidInput:
    return InvalidInput(f"the request has {count} Host headers; send exactly one (RFC 9112 section 3.2)")


_VALID: dict[bytes, bool] = {}  # Host values with their syntax verdict (clients send the same one every time)


def host_error(values: Sequence[bytes], *, http11: bool) -> InvalidInput | None:
    """RFC 9112 §3.2's 400, for any Host allow-list: an HTTP/1.1 request without Host, any request with more
    than one, or one whose value is not `host[:port]` (an empty value is valid: a target without authority)."""
    if len(values) == 1:
        value = values[0]
        valid = _VALID.get(value)
        if valid is None:
            valid = not value.strip() or host_name(value) is not None
            if len(_VALID) >= _SEEN_MAX:
                _VALID.clear()
            _VALID[value] = valid
        if valid:
            return None
        return InvalidInput(f"Host {value.decode('latin-1')[:100]!r} is not a valid host name or address with an "
                            "optional port (0-65535); send 'Host: NAME[:PORT]', e.g. 'Host: localhost:8000' "
                            "(RFC 9112 section 3.2)")
    if values:
        return several_hosts(len(values))
    if http11:
        return InvalidInput("an HTTP/1.1 request must carry a Host header (RFC 9112 section 3.2); send one, "
                            "e.g. 'Host: localhost:8000'")
    return None


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """The setting's entries, lowercased: `*`, `*.suffix`, a host name or an IP address (no port); ValueError
    naming the bad entry and what is accepted."""
    out = []
    for raw in patterns:
        entry = raw.strip().lower()
        if entry == ANY:
            out.append(ANY)
            continue
        name = _canonical(entry[2:] if entry.startswith("*.") else entry)
        if name is None or (entry.startswith("*.") and ":" in name):
            raise ValueError(f"allowed host {raw!r} is not valid: expected '*', a host name ('models.example.com'), "
                             "'*.example.com' for every name under it, or an IP address, without a port")
        out.append(f"*.{name}" if entry.startswith("*.") else name)
    return out


class HostRule:
    """The Host names one HTTP port answers besides the loopback ones; see the module's docstring."""

    __slots__ = ("_exact", "_seen", "_suffixes", "configured")

    def __init__(self, patterns: Sequence[str], *, configured: bool) -> None:
        self._exact = frozenset(p for p in patterns if not p.startswith("*."))
        self._suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))
        self.configured = configured  # names were given (not the loopback default): they are not echoed
        self._seen: dict[bytes, bool] = {}

    def allows(self, value: bytes) -> bool:
        """Whether a Host header value names this server."""
        verdict = self._seen.get(value)
        if verdict is None:
            name = host_name(value)
            verdict = name is not None and (name in self._exact or name.endswith(self._suffixes)
                                            or is_loopback(name))
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[value] = verdict
        return verdict

    def denial(self, headers: Iterable[tuple[bytes, bytes]]) -> ServingError | None:
        """The error for a request with these (ASGI, lowercased) headers; None when its Host is answered.

        A request without Host (HTTP/1.0 clients) is answered: a browser always sends one."""
        values = [v for k, v in headers if k == b"host"]
        refused = host_error(values, http11=False)  # the HTTP protocol refuses HTTP/1.1 without Host itself
        if refused is not None:
            return refused
        if not values or self.allows(values[0]):
            return None
        names = ("localhost and the names configured" if self.configured
                 else "localhost, names under .localhost and loopback addresses (this server is bound to loopback)")
        return MisdirectedRequest(f"Host {values[0].decode('latin-1')[:100]!r} is not served here: this server "
                                  f"answers {names}; add the name to the allowed hosts ({_SETTING})")


def host_rule(*, allowed: Sequence[str] | None, bind_host: str) -> HostRule | None:
    """The rule for an HTTP port bound to `bind_host` with setting `allowed` (None: the default); None when any
    Host is answered."""
    if allowed is None:
        allowed = [] if is_loopback(bind_host) else [ANY]
        configured = False
    else:
        configured = True
    patterns = check_patterns(allowed)
    if ANY in patterns:
        return None
    bound = _canonical(bind_host)
    if bound is not None and bound not in ("0.0.0.0", "::"):
        patterns.append(bound)
    return HostRule(patterns, configured=configured)

"""SIP messages (RFC 3261 section 7): parse, inspect, build. Strict where it protects us.

`parse()` raises `SipError` for anything malformed: a bad start line, a header without a
colon, a missing mandatory header, a body shorter than Content-Length, a message over
`MAX_MESSAGE` bytes. Header names are canonical (compact forms expanded); values of
headers that may be comma-lists (Via, Route, Record-Route, Contact) are split.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

MAX_MESSAGE = 16 * 1024  # bytes; larger UDP datagrams are dropped
MAX_HEADERS = 100  # header values, after comma-lists are split
MAX_VIAS = 16  # a request through more proxies than this is refused (and not answered)
MAX_NUMBER = 2**31 - 1  # CSeq and Content-Length (RFC 3261 8.1.1.5)
SIP_VERSION = "SIP/2.0"
COMPACT = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "r": "Refer-To",
    "b": "Referred-By",
}
CANONICAL = {
    name.lower(): name
    for name in (
        "Call-ID",
        "CSeq",
        "WWW-Authenticate",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Max-Forwards",
        "Record-Route",
        "User-Agent",
        "MIME-Version",
        "Refer-To",
        "Referred-By",
        "Allow-Events",
        "Content-Length",
        "Content-Type",
        "Min-Expires",
        "Retry-After",
        "Event",
    )
}
LIST_HEADERS = {"Via", "Route", "Record-Route", "Contact"}
MANDATORY = ("Via", "From", "To", "Call-ID", "CSeq")
TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")
REASONS = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    415: "Unsupported Media Type",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


class SipError(ValueError):
    """A message that cannot be used (answered with 400 when it is a request).

    `partial` holds what could be parsed (the start line and the headers before the bad
    one), so that a malformed request can still be answered.
    """

    partial: Message | None = None


def number(text: str, what: str, low: int = 0, high: int = MAX_NUMBER) -> int:
    """A decimal number of ASCII digits in [low, high]; raises SipError (never ValueError).

    `str.isdigit()` accepts Unicode digits that `int()` refuses, and `int()` refuses (or
    spends time on) thousands of digits: every number from a peer goes through here.
    """
    text = text.strip()
    if 0 < len(text) <= len(str(high)) and text.isascii() and text.isdigit():
        value = int(text)
        if low <= value <= high:
            return value
    raise SipError(f"bad {what}")


def canonical(name: str) -> str:
    name = name.strip()
    low = name.lower()
    if low in COMPACT:
        return COMPACT[low]
    return CANONICAL.get(low) or "-".join(part.capitalize() for part in name.split("-"))


def split_list(value: str) -> list[str]:
    """Split a comma-list header value, respecting quotes and <...>."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(value):
        if ch == '"' and (i == 0 or value[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and not quoted and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


@dataclass
class Message:
    """A SIP request (`method`, `uri`) or response (`status`, `reason`)."""

    method: str = ""
    uri: str = ""
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str, default: str = "") -> str:
        name = canonical(name)
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        name = canonical(name)
        return [value for key, value in self.headers if key == name]

    def set(self, name: str, value: str) -> None:
        """Replace every value of the header with one."""
        name = canonical(name)
        self.headers = [(k, v) for k, v in self.headers if k != name]
        self.headers.append((name, value))

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        item = (canonical(name), value)
        if first:
            self.headers.insert(0, item)
        else:
            self.headers.append(item)

    def remove(self, name: str) -> None:
        name = canonical(name)
        self.headers = [(k, v) for k, v in self.headers if k != name]

    @property
    def call_id(self) -> str:
        return self.get("Call-ID")

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method); `parse()` has checked both."""
        seq, _, method = self.get("CSeq").partition(" ")
        return number(seq, "CSeq"), method.strip()

    @property
    def branch(self) -> str:
        return param(self.get("Via"), "branch")

    def to_bytes(self) -> bytes:
        start = (
            f"{self.method} {self.uri} {SIP_VERSION}"
            if self.is_request
            else f"{SIP_VERSION} {self.status} {self.reason}"
        )
        lines = [start]
        lines += [f"{k}: {v}" for k, v in self.headers if k != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def parse(data: bytes) -> Message:
    """One SIP message from a datagram; raises SipError."""
    if len(data) > MAX_MESSAGE:
        raise SipError(f"message of {len(data)} bytes (limit {MAX_MESSAGE})")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    if not sep:
        raise SipError("no blank line after the headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipError("headers are not UTF-8") from None
    lines = text.replace("\r\n", "\n").split("\n")
    msg = _start_line(lines[0])
    try:
        return _headers_and_body(msg, lines[1:], body)
    except SipError as exc:
        exc.partial = msg
        raise


def _headers_and_body(msg: Message, lines: list[str], body: bytes) -> Message:
    unfolded: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t") and unfolded:
            unfolded[-1] += " " + line.strip()
        elif line:
            unfolded.append(line)
    if len(unfolded) > MAX_HEADERS:
        raise SipError(f"more than {MAX_HEADERS} headers")
    for line in unfolded:
        name, colon, value = line.partition(":")
        if not colon or not TOKEN.match(name.strip()):
            raise SipError("bad header line")
        key = canonical(name)
        values = split_list(value) if key in LIST_HEADERS else [value.strip()]
        msg.headers += [(key, v) for v in values]
        if len(msg.headers) > MAX_HEADERS or len(msg.get_all("Via")) > MAX_VIAS:
            msg.headers = []  # not answered: the answer would copy them all
            raise SipError("too many header values")
    for name in MANDATORY:
        if not msg.get(name):
            raise SipError(f"missing {name}")
    seq, method = msg.get("CSeq").partition(" ")[::2]
    number(seq, "CSeq")
    if not TOKEN.match(method.strip()):
        raise SipError("bad CSeq method")
    for name in ("From", "To"):
        parse_address(msg.get(name))
    length = msg.get("Content-Length")
    if length:
        size = number(length, "Content-Length")
        if size > len(body):
            raise SipError("body shorter than Content-Length")
        body = body[:size]
    msg.body = body
    return msg


def _start_line(line: str) -> Message:
    parts = line.split(" ", 2)
    if len(parts) != 3:
        raise SipError("bad start line")
    if parts[0] == SIP_VERSION:
        return Message(status=number(parts[1], "status", 100, 699), reason=parts[2])
    method, uri, version = parts
    if (
        version != SIP_VERSION
        or not TOKEN.match(method)
        or not uri.startswith(("sip:", "sips:", "tel:"))
    ):
        raise SipError("bad request line")
    return Message(method=method.upper(), uri=uri)


# -- values ------------------------------------------------------------------------------------


def param(value: str, name: str) -> str:
    """A `;name=value` parameter of a header value (outside <...>)."""
    tail = value.rsplit(">", 1)[-1] if "<" in value else value
    for part in tail.split(";")[1:]:
        key, _, val = part.partition("=")
        if key.strip().lower() == name:
            return val.strip().strip('"')
    return ""


@dataclass
class Address:
    """A name-addr or addr-spec: `"Display" <sip:user@host>;tag=x`."""

    display: str
    uri: str
    params: str  # everything after the address, with its leading ';'

    @property
    def tag(self) -> str:
        return param(";" + self.params.lstrip(";"), "tag") if self.params else ""

    def __str__(self) -> str:
        name = f'"{self.display}" ' if self.display else ""
        return f"{name}<{self.uri}>{self.params}"


def parse_address(value: str) -> Address:
    value = value.strip()
    if "<" in value:
        display, _, rest = value.partition("<")
        uri, close, params = rest.partition(">")
        if not close:
            raise SipError("unclosed <> in an address")
        return Address(display.strip().strip('"'), uri.strip(), params.strip())
    uri, semi, params = value.partition(";")
    return Address("", uri.strip(), (semi + params) if semi else "")


@dataclass
class Uri:
    scheme: str
    user: str
    host: str
    port: int
    params: dict[str, str]


def parse_uri(uri: str) -> Uri:
    """`sip:user@host:port;params` (IPv4, IPv6 in [], or a name)."""
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        raise SipError("not a SIP URI")
    rest = rest.split("?", 1)[0]
    main, *param_parts = rest.split(";")
    user, at, hostport = main.rpartition("@")
    if not at:
        user, hostport = "", main
    if hostport.startswith("["):
        host, _, port_text = hostport[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise SipError("no host in a SIP URI")
    port = number(port_text, "URI port", 1, 65535) if port_text else 5060
    params = {}
    for part in param_parts:
        key, _, value = part.partition("=")
        params[key.lower()] = value
    return Uri(scheme.lower(), user, host, port, params)


def new_tag() -> str:
    return secrets.token_hex(5)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(12)}@{host}"


def response(request: Message, status: int, reason: str = "", *, to_tag: str = "") -> Message:
    """A response to `request` (RFC 3261 8.2.6): Via, From, To (+tag), Call-ID, CSeq copied."""
    res = Message(status=status, reason=reason or REASONS.get(status, "Unknown"))
    for via in request.get_all("Via"):
        res.add("Via", via)
    res.add("From", request.get("From"))
    to = request.get("To")
    if to_tag and not parse_address(to).tag:
        to = f"{to};tag={to_tag}"
    res.add("To", to)
    res.add("Call-ID", request.call_id)
    res.add("CSeq", request.get("CSeq"))
    if request.method in ("INVITE", "SUBSCRIBE", "REFER") and 100 < status < 300:
        for route in request.get_all("Record-Route"):
            res.add("Record-Route", route)
    return res

"""HTTP events checked for what Mangum reads of them, and the 400 a malformed one gets.

API Gateway, Function URLs and ALBs always send well-formed events, but a function is also
invoked by hand, with console test events, through custom integrations and with events
forwarded from elsewhere. Mangum reads such an event's fields without looking at their types:
headers that are not strings, a `requestContext` that is not an object, `isBase64Encoded` with
a body that is not base64 or a Host header whose port is not a number raised a bare TypeError,
AttributeError or ValueError from inside Mangum, and the invocation failed with nothing to say
which field was wrong. `checked` looks at exactly the fields Mangum reads, a few type checks
for a well-formed event, and decodes the body once (Mangum would have), so Mangum reads only
what it cannot fail on; `bad_event_answer` is the InvalidInput answer in the shape the event's
source expects, with the JSON error body and an `X-Request-Id`, as the app answers errors.
A Host that is an IPv6 address (`[::1]:8443`) Mangum cannot read either (it splits the Host at
every colon): Mangum reads a stand-in, and `served` gives the app the Host and server.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Iterable
from itertools import chain
from typing import Any

from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane import Reply
from edgerun.adapters.dataplane.call import JSON
from edgerun.adapters.dataplane.hooks import request_id
from edgerun.adapters.http.asgi import ASGIApp, Receive, Scope, Send, response_head
from edgerun.runtime.errors import InvalidInput

#: Where the event Mangum reads keeps the Host header and server of an IPv6 Host, in whose
#: place Mangum reads `_STAND_IN`.
_HOST_ASIDE = "edgerun.ipv6Host"
_STAND_IN = "ipv6-host:0"


def checked(event: dict[str, Any]) -> dict[str, Any]:
    """The event with its body as bytes, for Mangum; InvalidInput naming the first field
    Mangum could not read."""
    source = _source(event)
    context = event["requestContext"]
    if source == "v2":
        http = context.get("http")
        if not isinstance(http, dict):
            raise InvalidInput("requestContext.http of an HTTP API (payload 2.0) event is not "
                               "an object")
        for name in ("method", "path"):
            _text(http.get(name), f"requestContext.http.{name}")
        if "sourceIp" not in http:
            raise InvalidInput("requestContext.http.sourceIp is missing")
        _text(event.get("rawQueryString", ""), "rawQueryString")
        for i, cookie in enumerate(event.get("cookies") or ()):
            _text(cookie, f"cookies[{i}]")
    else:
        _text(event.get("httpMethod"), "httpMethod")
        if "path" not in event:
            raise InvalidInput("path is missing")
        if event["path"]:
            _text(event["path"], "path")
        if source == "v1" and not isinstance(context.get("identity", {}), dict):
            raise InvalidInput("requestContext.identity is not an object")
        _query(event, source)
    host, server = _server(_headers(event, source))
    event = {**event, "body": _body(event), "isBase64Encoded": False}
    return _ipv6_host_aside(event, host, server) if host.startswith("[") else event


def served(app: ASGIApp) -> ASGIApp:
    """`app` given the Host header and server of an event `checked` put its IPv6 Host aside
    for: the header as the caller sent it (hooks read it), the server as its address."""
    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        aside = scope.get("aws.event", {}).get(_HOST_ASIDE) if scope["type"] == "http" \
            else None
        if aside is not None:
            host, (name, port) = aside
            scope = {**scope, "server": (name, port), "headers": [
                [key, host.encode() if key == b"host" else value]
                for key, value in scope["headers"]]}
        await app(scope, receive, send)
    return serve


def bad_event_answer(event: dict[str, Any], error: InvalidInput) -> dict[str, Any]:
    """The 400 answering a malformed HTTP event, shaped as Mangum shapes answers to its
    source (an ALB's headers as it sent its own, one or many a name), with the caller's
    `x-request-id` where it is one, else a new id."""
    body = oip.encode_error(str(error))
    status, raw = response_head(Reply(body, JSON, {"X-Request-Id": request_id(
        _given_request_id(event))}, error))
    headers = {name.decode(): value.decode() for name, value in raw}
    answer: dict[str, Any] = {"statusCode": status, "body": body.decode(),
                              "isBase64Encoded": False}
    if "multiValueHeaders" in event and _shape(event) == "alb":
        answer["multiValueHeaders"] = {name: [value] for name, value in headers.items()}
    elif _shape(event) == "v1":
        answer.update(headers=headers, multiValueHeaders={})
    else:
        answer["headers"] = headers
    return answer


def _shape(event: dict[str, Any]) -> str:
    """The source an event's answer is shaped for, even where its requestContext is not an
    object: an event with no version and no resource is shaped as an ALB's (headers alone,
    which a REST API takes too)."""
    context = event.get("requestContext")
    if isinstance(context, dict) and "elb" in context:
        return "alb"
    if "version" in event:
        return "v2" if event["version"] == "2.0" else "v1"
    return "v1" if "resource" in event else "alb"


def _source(event: dict[str, Any]) -> str:
    """"alb", "v2" (HTTP API payload 2.0, Function URL) or "v1" (REST API, payload 1.0), as
    Mangum picks its handler; InvalidInput where Mangum has none."""
    context = event.get("requestContext")
    if not isinstance(context, dict):
        raise InvalidInput("requestContext of an HTTP event is "
                           f"{'missing' if context is None else 'not an object'}")
    if "elb" in context:
        return "alb"
    if "version" in event:
        return "v2" if event["version"] == "2.0" else "v1"
    if "resource" in event:
        return "v1"
    raise InvalidInput("the HTTP event names no source: requestContext.elb (ALB), version "
                       "(HTTP API, Function URL) or resource (REST API)")


def _text(value: Any, where: str) -> str:
    """`value` where it is a string Mangum can encode (JSON allows a lone surrogate)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{where} is {type(value).__name__}, not a string")
    if not _encodes(value):
        raise InvalidInput(f"{where} is not valid Unicode (it holds a lone surrogate)")
    return value


def _encodes(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _all_text(values: Iterable[Any]) -> bool:
    """Whether all of `values` are strings Mangum can encode: one join and one scan, in C,
    for the warm path; the culprit is looked for only where one is not."""
    try:
        return _encodes("".join(values))
    except TypeError:
        return False


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} is " + ("missing or null" if value is None else
                                            f"{type(value).__name__}, not an object"))
    return value


def _headers(event: dict[str, Any], source: str) -> dict[str, str]:
    """The request's headers by lower-case name, as Mangum merges them for the source."""
    if source == "alb" and "multiValueHeaders" in event:  # the last value of a name
        return {name.lower(): values[-1] for name, values in _multi_value(event).items()
                if values}
    given = event.get("headers") if source == "alb" else event.get("headers", {})
    if source == "v1":
        given = given or {}
    if not (_all_text(_mapping(given, "headers")) and _all_text(given.values())):
        for name, value in given.items():
            _text(value, f"headers[{_text(name, 'a header name')!r}]")
    merged = {name.lower(): value for name, value in given.items()}
    if source == "v1" and event.get("multiValueHeaders"):  # each name's values, joined
        merged.update({name.lower(): ", ".join(values)
                       for name, values in _multi_value(event).items()})
    return merged


def _multi_value(event: dict[str, Any]) -> dict[str, list[str]]:
    """`multiValueHeaders`: an object of lists of strings."""
    headers = _mapping(event.get("multiValueHeaders"), "multiValueHeaders")
    if all(type(values) is list for values in headers.values()) and _all_text(headers) \
            and _all_text(chain.from_iterable(headers.values())):
        return headers
    for name, values in headers.items():
        _text(name, "a multiValueHeaders name")
        if not isinstance(values, list):
            raise InvalidInput(f"multiValueHeaders[{name!r}] is {type(values).__name__}, "
                               "not a list of strings")
        for i, value in enumerate(values):
            _text(value, f"multiValueHeaders[{name!r}][{i}]")
    return headers


def _server(headers: dict[str, str]) -> tuple[str, tuple[str, int]]:
    """The Host header and the server it names as an ASGI scope's (an IPv6 address without
    its brackets): NAME:PORT, [IPV6]:PORT, or a name alone on X-Forwarded-Port (else 80)."""
    host = headers.get("host", "mangum")
    name, colon, port = host.rpartition(":") if ":" in host else (host, "", "")
    where = f"the Host header {host!r}"
    if host.startswith("["):  # an IP-literal, its port after the "]" if any
        address, bracket, rest = host[1:].partition("]")
        name, colon, port = address, rest[:1], rest[1:]
        if not bracket or rest[:1] not in ("", ":") or not _ipv6(address):
            raise InvalidInput(f"{where} is not NAME:PORT or [IPV6 ADDRESS]:PORT")
    elif ":" in name:
        raise InvalidInput(f"{where} is not NAME:PORT (an IPv6 address is given in brackets)")
    if not colon:
        port, where = headers.get("x-forwarded-port", "80"), "the X-Forwarded-Port header"
    try:
        return host, (name, int(port))
    except ValueError:
        raise InvalidInput(f"{where}: port {port!r} is not a number") from None


def _ipv6(address: str) -> bool:
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True


def _ipv6_host_aside(event: dict[str, Any], host: str,
                     server: tuple[str, int]) -> dict[str, Any]:
    """The event with a Host Mangum reads in place of an IPv6 one (Mangum 0.22 splits the Host
    at every colon, and raised ValueError), the Host and server kept for `served`."""
    fields: dict[str, Any] = {_HOST_ASIDE: (host, server)}
    for field, stand_in in (("headers", _STAND_IN), ("multiValueHeaders", [_STAND_IN])):
        given = event.get(field)
        if isinstance(given, dict):
            fields[field] = {name: stand_in if name.lower() == "host" else value
                             for name, value in given.items()}
    return {**event, **fields}


def _query(event: dict[str, Any], source: str) -> None:
    """The query parameters Mangum encodes: an object of strings or lists of strings."""
    if source == "alb":
        name = "multiValueQueryStringParameters" if "multiValueQueryStringParameters" in event \
            else "queryStringParameters"
    else:
        name = "multiValueQueryStringParameters" if event.get(
            "multiValueQueryStringParameters") else "queryStringParameters"
    params = event.get(name)
    if not params:
        return
    for key, value in _mapping(params, name).items():
        _text(key, f"a {name} name")
        for i, item in enumerate(value if isinstance(value, list) else (value,)):
            _text(item, f"{name}[{key!r}]" + (f"[{i}]" if isinstance(value, list) else ""))


def _body(event: dict[str, Any]) -> bytes:
    """The body's bytes, decoded once as Mangum would (base64 as leniently)."""
    body = event.get("body") or b""
    if isinstance(body, bytes) and not event.get("isBase64Encoded"):
        return body
    if not isinstance(body, (str, bytes)):
        raise InvalidInput(f"body is {type(body).__name__}, not a string")
    if event.get("isBase64Encoded"):
        try:
            return base64.b64decode(body)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"body is not base64, as isBase64Encoded says ({exc})") from None
    try:
        return body.encode()
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"body is not valid Unicode ({exc})") from None


def _given_request_id(event: dict[str, Any]) -> str | None:
    """The caller's `x-request-id` header, where a malformed event has one as a string."""
    for field in ("headers", "multiValueHeaders"):
        headers = event.get(field)
        if not isinstance(headers, dict):
            continue
        for name, value in headers.items():
            if isinstance(name, str) and name.lower() == "x-request-id":
                value = value[-1] if isinstance(value, list) and value else value
                if isinstance(value, str):
                    return value
    return None

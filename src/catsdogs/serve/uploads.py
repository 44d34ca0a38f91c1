"""Reading uploads safely: a bounded request body and an in-memory multipart parser.

The body limit is checked against ``Content-Length`` first and enforced again while reading, so a
client that lies about the length or streams chunks cannot make the server hold more than
``max_bytes``. Uploads are parsed in memory (they are bounded), which avoids temporary files.

A body over the limit is still read to its end, chunk by chunk and thrown away, when it is at most
``--drain-bytes`` long: a client that sends its whole body before reading the answer (Python's urllib
and requests) would otherwise see the connection reset, because closing a socket with unread data
sends a TCP RST, and never read the 413. A longer body, or one whose client waits for
``100 Continue`` before sending it, is refused at once. The 413 always closes the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from catsdogs.config import flag

IMAGE_PART_TYPES: tuple[str, ...] = ("image/", "application/octet-stream")
"""Part content types taken as images (prefixes); an absent type is accepted too."""


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` with a JSON body ``{"error", "detail"}``."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}  # extra response headers, e.g. Connection: close


@dataclass
class Part:
    """One multipart form part."""

    name: str = ""
    filename: str | None = None
    content_type: str = ""
    chunks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def check_image_type(self) -> None:
        """Raise a 415 ApiError when the part declares a non-image type (e.g. text/html)."""
        ctype = self.content_type.split(";", 1)[0].strip().lower()
        if ctype and not ctype.startswith(IMAGE_PART_TYPES):
            raise ApiError(415, "unsupported_media_type",
                           f"part {self.name!r} has content type {ctype!r}; upload an image (image/*)")


def too_large(limit: int) -> ApiError:
    """The 413 refusal; it closes the connection, as any unread rest of the body must not be parsed."""
    return ApiError(413, "payload_too_large", f"request body exceeds {flag('max_bytes')}={limit} bytes",
                    headers={"Connection": "close"})


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        return int(declared)
    except ValueError:
        raise ApiError(400, "bad_request", f"invalid Content-Length {declared!r}") from None


async def read_body(request: Request, limit: int, deadline_s: float | None = None, drain: int = 0) -> bytes:
    """Read the request body, refusing more than ``limit`` bytes declared or received (413).

    A body over ``limit`` is read to its end and discarded before the 413 when it is at most ``drain``
    bytes in all, so that a client still sending it can read the answer; a longer one is refused as soon
    as that is known. Only the accepted body is kept in memory: while draining, each chunk is dropped.
    A body that has not fully arrived ``deadline_s`` seconds after reading began is refused too (408;
    413 if it was already too large), so a client trickling bytes cannot hold a worker for ever.
    """
    length = _declared_length(request)
    if length is not None and length > limit:
        # A client waiting for "100 Continue" has sent nothing yet: answering now saves it the upload.
        waiting = request.headers.get("expect", "").lower() == "100-continue"
        if length > drain or waiting:
            raise too_large(limit)
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received <= limit:
                    chunks.append(chunk)
                elif received > drain:  # a chunked upload past the drain bound: stop reading now
                    raise too_large(limit)
                else:
                    chunks.clear()  # over the limit: keep reading, keep nothing
    except TimeoutError:
        if received > limit:
            raise too_large(limit) from None
        raise ApiError(408, "request_timeout", f"the body did not arrive within {flag('body_timeout_s')}="
                                               f"{deadline_s:g} s ({received} bytes received)") from None
    if received > limit:
        raise too_large(limit)
    return b"".join(chunks)


def multipart_boundary(content_type: str) -> bytes:
    """Return the boundary of a multipart/form-data content type; 415 for any other type."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        shown = ctype.decode("latin-1") or "none"
        raise ApiError(415, "unsupported_media_type",
                       f"content type {shown!r} is not multipart/form-data; send the image as a form file")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary")
    return boundary


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """Parse a complete multipart/form-data body into parts (400 when malformed)."""
    boundary = multipart_boundary(content_type)
    parts: list[Part] = []
    header_field: list[bytes] = []
    header_value: list[bytes] = []
    headers: dict[bytes, bytes] = {}

    def on_part_begin() -> None:
        headers.clear()
        parts.append(Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        headers[b"".join(header_field).lower()] = b"".join(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        part = parts[-1]
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        part.content_type = headers.get(b"content-type", b"").decode("latin-1")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].chunks.append(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
    return parts

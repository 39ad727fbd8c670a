"""HTTP/1.1 framing for the etcd gateway: request bytes out, response events in.

Sans-IO: :class:`ResponseParser` takes bytes with :meth:`~ResponseParser.feed` and reports
what it parsed through three hooks that a subclass overrides; :func:`request_head` /
:func:`build_request` produce request bytes.  Parsing is done by httptools (llhttp), which
also undoes chunked transfer-encoding -- the gateway streams watch and keep-alive answers
chunked.
"""

from __future__ import annotations

import httptools

__all__ = ["ProtocolError", "ResponseParser", "build_request", "request_head"]


class ProtocolError(Exception):
    """The server sent bytes that are not a valid HTTP/1.1 response."""


def request_head(host: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """The request line and fixed headers of a JSON POST, up to ``Content-Length: ``.

    Built once per (endpoint, path, headers) and reused: only the length and body vary.
    """
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             "Accept: application/json"]
    for name, value in (headers or {}).items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}")
    lines.append("Content-Length: ")
    return "\r\n".join(lines).encode("latin-1")


def build_request(head: bytes, body: bytes) -> bytes:
    """One complete request: a head from :func:`request_head`, then the body."""
    return b"%s%d\r\n\r\n%s" % (head, len(body), body)


class ResponseParser:
    """Incremental HTTP/1.1 response parser for one keep-alive connection: a base class.

    A subclass overrides the hooks; httptools calls them directly (this runs once per
    answer, so no adapter sits in between):

    * :meth:`on_head` -- the headers are complete, with the status code (interim 1xx
      answers are skipped: the real answer follows); not called at all when made with
      ``heads=False``, for a user who only needs whole answers (httptools then has one
      Python callback less to make per answer);
    * :meth:`on_body` -- a piece of body (already de-chunked), in order;
    * :meth:`on_complete` -- a whole response has arrived; :attr:`keep_alive` is then
      whether the connection may carry another request.

    :attr:`status` is the status code of the answer being parsed (or last parsed); with
    ``heads=False`` it is set only when the answer is complete (in :meth:`on_body` it still
    holds the previous answer's).  A subclass overrides the three hooks only: httptools'
    own callbacks (``on_headers_complete``, ``on_message_complete``) belong to this class.

    Raises (from :meth:`feed`):
        ProtocolError: the bytes are not a valid response.
    """

    def __init__(self, heads: bool = True) -> None:
        self.status = 0
        self.keep_alive = True
        if heads:
            # httptools looks its callbacks up once, when the parser is made: without this
            # attribute it makes no call at the end of the headers.
            self.on_headers_complete = self._headers_complete
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # etcd never switches protocols; coord never asks it to.
            raise ProtocolError(f"unexpected protocol upgrade: {e}") from e
        except httptools.HttpParserError as e:
            raise ProtocolError(str(e)) from e

    # hooks ------------------------------------------------------------------------------------

    def on_head(self, status: int) -> None:
        """The headers of an answer are complete."""

    def on_body(self, body: bytes) -> None:
        """A piece of the answer's body (httptools' own callback)."""

    def on_complete(self) -> None:
        """The answer is complete."""

    # httptools callbacks -------------------------------------------------------------------

    def _headers_complete(self) -> None:
        status = self.status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (RFC 9110 15.2): the real one follows
        self.on_head(status)

    def on_message_complete(self) -> None:
        parser = self._parser
        status = self.status = parser.get_status_code()
        if 100 <= status < 200:
            return
        self.keep_alive = parser.should_keep_alive()
        self.on_complete()

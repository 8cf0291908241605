"""The one error type of the upload app: a request it refuses, as an HTTP status and a one-line
reason for the client."""

from __future__ import annotations

#: Longest piece of client-supplied text quoted in a reason.
QUOTE_LIMIT = 80


class HTTPError(Exception):
    """A request that cannot be served: status and a one-line message for the client.

    `fatal`: the request body can no longer be trusted or read (stop a multipart upload);
    otherwise only the current file failed and the next parts can still be processed.
    """

    def __init__(
        self,
        status: int,
        message: str,
        fatal: bool = False,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        message = " ".join(message.split()) if ("\n" in message or "\r" in message) else message
        super().__init__(message)
        self.status = status
        self.message = message
        self.fatal = fatal
        self.headers = headers


class ClientDisconnected(HTTPError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message, fatal=True)


class ClientStalled(HTTPError):
    def __init__(self, message: str) -> None:
        super().__init__(408, message, fatal=True)


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` as a short, one-line, ASCII quotation: repr() (control and non-ASCII characters
    escaped), cut to about `limit` characters with the full length noted."""
    shown = ascii(text[:limit])
    if len(text) > limit:
        shown += f"... ({len(text)} characters)"
    return shown


def clip(text: str, limit: int = 200) -> str:
    """`text` on one line, ASCII (other characters escaped), at most about `limit` long."""
    shown = ascii(" ".join(text.split()))[1:-1]
    return shown if len(shown) <= limit else shown[:limit] + "..."

"""What of a URL may be shown in a log line or an error message.

Credentials in a URL and its query string are secrets as often as not: a presigned S3 or GCS URL
carries its signature (and sometimes a session token) in the query. Logs and error messages show
scheme, host and path only; the full URL stays in the job record, where only the worker reads it
to fetch the media, and its own tenant sees what it sent.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.-]*://)([^:/@\s]*):([^@/\s]+)@", re.IGNORECASE)
# The query (and fragment) of any URL in free text: up to whitespace or a closing quote.
_URL_QUERY = re.compile(r"([a-z][a-z0-9+.-]*://[^\s?#\"'<>]*)[?#][^\s\"'<>]*", re.IGNORECASE)
# Signing parameters of the common object stores, wherever they appear (a request line logged
# without its scheme, say).
_SIGNING_PARAMETER = re.compile(
    r"(?<![\w-])((?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)"
    r"|signature|sig|awsaccesskeyid|access_token|token)=)[^&\s\"'<>]+",
    re.IGNORECASE,
)
HIDDEN = "***"


def redact(text: str) -> str:
    """Every URL in ``text`` without its password and query:
    ``redis://user:secret@host`` becomes ``redis://user:***@host``, ``https://h/v.mp4?X-Amz-...``
    becomes ``https://h/v.mp4?***``."""
    text = _URL_CREDENTIALS.sub(rf"\1\2:{HIDDEN}@", text)
    text = _URL_QUERY.sub(rf"\1?{HIDDEN}", text)
    return _SIGNING_PARAMETER.sub(rf"\1{HIDDEN}", text)


def public_url(url: str) -> str:
    """``url`` as an error message may show it: no user, password, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return redact(url)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    query = HIDDEN if parts.query or parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))

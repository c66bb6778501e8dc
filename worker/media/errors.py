"""What a decoder's failure means, in words for the person who sent the file.

FFmpeg's errors read like ``[Errno 1094995529] Invalid data found when processing input:
'/tmp/videoqa-1x2/video-0.mp4'``: an errno only FFmpeg knows and a path on the worker. A job's
error carries the plain reason instead; the full text goes to the worker's log.
"""

from __future__ import annotations

import errno
import logging
import re

import av

from common.redaction import redact

log = logging.getLogger(__name__)

_BY_TYPE: tuple[tuple[type[BaseException], str], ...] = (
    (av.error.InvalidDataError, "its data is damaged or in no format this service reads"),
    (av.error.EOFError, "it ends before its data does (a truncated file?)"),
    (av.error.DecoderNotFoundError, "it is encoded with a codec this service cannot decode"),
    (av.error.DemuxerNotFoundError, "its container format is not supported"),
    (av.error.PatchWelcomeError, "it uses a feature the decoder does not support"),
    (av.error.NotImplementedError, "it uses a feature the decoder does not support"),
    (UnicodeDecodeError, "it is not a media file"),
)
# An errno, and a quoted absolute path, as FFmpeg and Python write them.
_ERRNO = re.compile(r"\[Errno -?\d+\]\s*")
_PATH = re.compile(r"""\s*['"]/[^'"]*['"]|(?:(?<=\s)|^)/\S+""")


def plain_reason(exc: BaseException) -> str:
    """``exc`` (from PyAV, Pillow or a decoder bug) as a short reason without errno or paths."""
    log.info("media error: %s: %s", type(exc).__name__, redact(str(exc)))
    if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == errno.ENOMEM:
        return "it needs more memory to decode than the limit allows"
    for kind, reason in _BY_TYPE:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        text = str(exc.strerror)
    elif isinstance(exc, (OSError, ValueError, SyntaxError)):
        text = str(exc.args[0]) if exc.args else ""
    else:
        return "the decoder failed on it"
    text = _PATH.sub("", _ERRNO.sub("", text)).strip(" :")
    return (text[:1].lower() + text[1:]) if text else "the decoder failed on it"

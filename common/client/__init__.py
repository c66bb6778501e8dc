"""The Python client of videoqa's API. Needs only the base install (no torch, Flask or PyAV).

from common.client import Client

result = Client("http://127.0.0.1:8000").ask(["cats_1.mp4"], "What is the cat doing?")
print(result.answer, [(frame.video, frame.time) for frame in result.frames])
"""

from common.client.client import DEFAULT_SERVER, Client
from common.client.errors import APIError, EventsUnavailable, JobFailed, Unreachable, VideoQAError, WaitTimedOut
from common.client.models import Event, Frame, Job, JobPage, Result, StoredVideo, Usage
from common.client.sse import SSEMessage, parse_sse

__all__ = [
    "DEFAULT_SERVER",
    "APIError",
    "Client",
    "Event",
    "EventsUnavailable",
    "Frame",
    "Job",
    "JobFailed",
    "JobPage",
    "Result",
    "SSEMessage",
    "StoredVideo",
    "Unreachable",
    "Usage",
    "VideoQAError",
    "WaitTimedOut",
    "parse_sse",
]

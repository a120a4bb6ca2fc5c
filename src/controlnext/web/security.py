"""What a request to the web app may touch: only files the server received or served, only same-site posts.

* :class:`UploadRecord` turns a file payload of an event into a server path, and accepts only the files this app's
  gradio server received through its upload route or placed in its own cache (a restored condition, a result).
  Gradio checks a payload's path only when the payload carries its ``meta`` marker, so without this check a client
  can name any file the server process can read. Everything else gets :data:`REFUSED`, one message that does not
  say whether the path exists.
* :class:`SameSiteMiddleware` refuses state-changing requests (uploads, event calls) that a browser sends on behalf
  of another site (a cross-site form post needs no CORS preflight, and gradio answers it).
* :func:`client_gone` tells a running event that its client disconnected (gradio marks the job dead but cannot stop
  a function that is already running).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

__all__ = ["REFUSED", "UploadRefused", "UploadRecord", "SameSiteMiddleware", "client_gone", "in_event"]

REFUSED = "This file was not uploaded to this app (or its upload has expired); please upload it again."


class UploadRefused(ValueError):
    """A file payload naming a file this server did not receive (the message never says whether it exists)."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


def in_event() -> bool:
    """True while the calling thread runs an event of a gradio server (its input came from a client)."""
    from gradio.context import LocalContext

    return bool(LocalContext.in_event_listener.get(False))


def _payload_path(payload: Any) -> str | None:
    if payload is None or isinstance(payload, str):
        return payload or None
    if isinstance(payload, dict):
        path = payload.get("path")
    else:
        path = getattr(payload, "path", None)
    if path is not None and not isinstance(path, str):
        raise UploadRefused()
    return path or None


class UploadRecord:
    """The files an event may read: those the bound gradio Blocks received (upload route) or cached itself.

    Outside a gradio event (a Python caller: tests, embedding) a path is taken as given, since the caller already
    has the server's file access. Inside one the path must be in the Blocks' record of uploaded and cached files
    (``upload_file_set`` and the components' ``temp_files``), which gradio keeps for the life of the server and
    trims when it deletes old cache files; if that record cannot be read, everything is refused.
    """

    def __init__(self) -> None:
        self.blocks: Any = None

    def bind(self, blocks: Any) -> None:
        self.blocks = blocks

    def _recorded(self, path: str) -> bool:
        sets = getattr(self.blocks, "temp_file_sets", None)
        if not sets:
            return False
        candidates = {path, os.path.abspath(path)}
        return any(c in s for s in list(sets) for c in candidates)

    def path(self, payload: Any) -> str | None:
        """The server path of a file payload (None when there is none); :class:`UploadRefused` for any other file."""
        path = _payload_path(payload)
        if path is None or not in_event():
            return path
        if not self._recorded(path) or not os.path.isfile(path):  # same refusal for absent and unrecorded files
            raise UploadRefused()
        return path


def client_gone() -> bool:
    """True when the gradio event running in this thread has lost its client (the page closed, the stream dropped).

    Gradio marks the job of a disconnected client as not alive; the running function has to look for itself. Any
    failure to find the job reads as "still there" (the request's time budget still bounds it).
    """
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        if blocks is None or event_id is None or not in_event():
            return False
        for jobs in list(getattr(blocks._queue, "active_jobs", None) or []):
            for job in list(jobs or []):
                if getattr(job, "_id", None) == event_id:
                    return not job.alive
    except (AttributeError, LookupError, TypeError):
        return False
    return False


def _site(value: str | None) -> str | None:
    if not value:
        return None
    parts = urlsplit(value if "//" in value else f"//{value}")
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port else host


class SameSiteMiddleware:
    """ASGI middleware: a POST/PUT/PATCH/DELETE whose ``Origin`` is not this server's own host gets 403.

    Browsers send ``Origin`` with every cross-origin POST (``null`` from sandboxed frames and files), so a page on
    another site cannot make this app store uploads or start events on the user's behalf. Requests without
    ``Origin`` (gradio_client, curl) are not browser requests made for another site and pass. ``sites`` holds
    further ``host[:port]`` names of this server (its share link), read on every request.
    """

    UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, app: Any, sites: set[str] | None = None) -> None:
        self.app = app
        self.sites = sites if sites is not None else set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in self.UNSAFE:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            origin = headers.get("origin")
            fetch_site = headers.get("sec-fetch-site", "")
            own = {_site(headers.get("host")), _site(headers.get("x-forwarded-host")), *self.sites} - {None}
            if fetch_site == "cross-site" or (origin is not None and _site(origin) not in own):
                from starlette.responses import PlainTextResponse

                response = PlainTextResponse("Cross-site requests are refused.", status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

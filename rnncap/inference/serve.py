"""``rnncap serve``: a web page and a JSON API that caption photos with one checkpoint.

    rnncap serve --checkpoint runs/demo/model/best.npz     # then open http://127.0.0.1:8000/
    curl -F image=@photo.jpg http://127.0.0.1:8000/api/caption

Read top to bottom: the limits, the app (``create_app``: routes, how an upload is
read, how captioning is kept off the event loop), what ``GET /api/model`` says about
a checkpoint, and the command.

Choices worth knowing:

- Every photo goes through ``Captioner`` exactly as in ``rnncap caption``:
  ``load_image`` on the uploaded bytes, then ``Captioner.features`` and
  ``Captioner.caption_details_from_features`` (``caption_details``), whose top caption
  is ``Captioner.caption``'s. The same photo gets the same caption both ways.
- What a photo is gets decided by its bytes (Pillow, through ``load_image``), never by
  its file name or MIME type. A request succeeds or fails whole: one unusable photo
  gives a 4xx JSON error ``{"error": "..."}`` that names it.
- The size limit is enforced while the body is read, whatever Content-Length says
  (a declared length over the limit is refused before reading, as a courtesy).
- Requests that arrive together are captioned together (``_Batcher``): up to
  ``max_batch`` photos, from any requests, make one encoder batch and one decoding
  batch per set of decoding options. A batch waits at most ``batch_wait_ms`` for
  more, and only for photos already on their way (requests admitted and still being
  read), so a lone client never waits. ``max_batch`` 1 captions photo by photo, as
  before batching. Each photo gets the caption it gets alone.
- Work is bounded: at most ``max_pending`` requests are admitted at once (reading,
  waiting or captioning), and ``workers`` threads caption. A request beyond that gets
  503 with Retry-After at once; nothing queues without bound. The admission is
  released when the request's captioning ends, so a client that hangs up cannot
  leave orphaned jobs piling up behind the bound.
- One worker by default: the encoder (torch) and the decoder (NumPy) each use every
  core already, and the model's BLAS limit is process-wide (rnncap.models.model).
- The page is static files in ``rnncap/inference/static`` and loads nothing from elsewhere; a
  Content-Security-Policy of ``'self'`` makes sure of it. ``/openapi.json`` describes
  the API; Swagger UI and ReDoc are switched off, since FastAPI's pull their assets
  from a CDN and would show a blank page offline.
- CORS is off (browsers allow only same-origin calls) unless ``--cors-origin`` names
  the origins that may call the API.
"""
import asyncio
import collections
import contextlib
import inspect
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CheckpointError, DataError, RnncapError
from ..data.images import DEFAULT_MAX_PIXELS

# Where `rnncap demo` (default --out runs/demo) keeps its best model.
DEMO_CHECKPOINT = os.path.join("runs", "demo", "model", "best.npz")
MB = 1024 * 1024
# An early answer (413, 503, ...) waits until the client has sent its body, up to this
# many times the upload limit and this long, so that every client can read it.
DRAIN_FACTOR, DRAIN_SECONDS = 4, 30.0
STATIC = Path(__file__).resolve().parent / "static"

# The page may load and call only this server; images are shown from blob: URLs.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
     b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass
class Limits:
    """What one server accepts and how much work it takes on at once."""
    max_bytes: int = 10 * MB            # one request body: all its photos together
    max_files: int = 8                  # photos per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # per photo, checked on the header before decoding
    max_beam: int = 10                  # beam (and n) a request may ask for
    workers: int = 1                    # threads that caption at the same time
    max_pending: int = 16               # requests admitted at once, workers included
    max_batch: int = 8                  # photos captioned together (one encoder batch)
    batch_wait_ms: float = 5.0          # how long a batch waits for more photos after its first
    # False: wait only while other requests are being read (their photos are coming);
    # True: wait the whole batch_wait_ms even then (clients that send bursts).
    batch_wait_always: bool = False


class ApiError(Exception):
    """A request the server refuses: HTTP status and a one-line message."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Gate:
    """Admission: at most ``capacity`` requests at once. Entered on the event loop,
    left there or by a worker thread when the job ends, hence the lock."""

    def __init__(self, capacity):
        self.capacity, self.count, self._lock = capacity, 0, threading.Lock()

    def enter(self):
        with self._lock:
            if self.count >= self.capacity:
                return False
            self.count += 1
            return True

    def leave(self):
        with self._lock:
            self.count -= 1


class _TooLarge(Exception):
    pass


def create_app(captioner, *, info=None, limits=None, cors_origins=()):
    """The FastAPI app around one captioner (anything with ``caption_details``).

    info: the dict ``GET /api/model`` returns (``describe_checkpoint``); limits: a
    ``Limits``; cors_origins: origins allowed to call the API from other pages.
    """
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    defaults = decoding_defaults(captioner)
    wants_attention = bool(getattr(captioner, "attends", False))  # Captioner.attends: attention models
    gate = _Gate(limits.max_pending)
    batcher = _Batcher(captioner, limits)
    seconds_per_job = [1.0]  # a running mean, for Retry-After
    index_html = (STATIC / "index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.close()  # queued requests get 503; a batch being captioned ends on its own

    app = FastAPI(title="rnncap", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", lifespan=lifespan,
                  description="Caption photos with a recurrent captioner. POST photos as multipart "
                              "field `image` to /api/caption. Errors are JSON: {\"error\": \"...\"}.")
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_DrainBody, bound=DRAIN_FACTOR * limits.max_bytes)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After"])

    def error(status, message, headers=None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request, e):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "body"))
        return error(422, f"query parameter {where}: {first.get('msg', 'invalid')}"
                          f" (got {first.get('input')!r})")

    @app.exception_handler(HTTPException)
    async def _http_error(request, e):
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, e):  # logged with its traceback by the server
        return error(500, f"internal error ({type(e).__name__}); the server log has the details")

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(index_html)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health", summary="Liveness and load")
    async def health():
        return {"status": "ok", "in_progress": gate.count, "capacity": gate.capacity,
                "workers": limits.workers, "batches": batcher.stats()}

    @app.get("/api/model", summary="What the checkpoint is")
    async def model():
        return {**(info or {}), "attention": wants_attention, "decoding_defaults": defaults,
                "limits": asdict(limits)}

    @app.post("/api/caption", summary="Caption one or several photos", openapi_extra=_upload_schema(limits),
              responses=_ERROR_RESPONSES)
    async def caption(
        request: Request,
        beam: int | None = Query(None, ge=1, le=limits.max_beam,
                                 description="beam size; 1 = greedy (default: the model's)"),
        n: int | None = Query(None, ge=1, le=limits.max_beam,
                              description="how many captions per photo, at most the beam (default 1)"),
        length_norm: float | None = Query(None, ge=0, le=10, allow_inf_nan=False,
                                          description="rank beams by logprob / len**length_norm"),
    ):
        kwargs = {k: v for k, v in (("beam", beam), ("n", n), ("length_norm", length_norm)) if v is not None}
        if wants_attention:
            kwargs["return_attention"] = True
        width = kwargs.get("beam", defaults.get("beam"))
        if width is not None and kwargs.get("n", 1) > max(width, 1):
            raise ApiError(422, f"query parameter n: at most the beam size ({width}) captions, "
                                f"got n={kwargs['n']}; raise beam too")
        if not gate.enter():
            wait = max(1, math.ceil(seconds_per_job[0] * gate.capacity / (limits.workers * limits.max_batch)))
            raise ApiError(503, f"busy: {gate.capacity} requests are in progress; retry in {wait} s",
                           {"Retry-After": str(wait)})
        submitted = False
        batcher.expect()
        try:
            t0 = time.perf_counter()
            photos = await _read_photos(request, limits)
            job = batcher.submit(photos, kwargs, expected=True)
            submitted = True
            job.add_done_callback(lambda _: gate.leave())
            results, started, ended = await asyncio.wrap_future(job)
        except DataError as e:
            raise ApiError(422, str(e)) from None
        finally:
            if not submitted:
                batcher.unexpect()
                gate.leave()
        seconds_per_job[0] = 0.8 * seconds_per_job[0] + 0.2 * (ended - started)
        return {"photos": results,
                "decoding": {**defaults, **{k: v for k, v in kwargs.items() if k != "return_attention"}},
                "ms": {"queued": _ms(started - t0), "total": _ms(time.perf_counter() - t0)}}

    return app


def _upload_schema(limits):
    """The request body of POST /api/caption, for /openapi.json (the body is read by hand)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "array", "minItems": 1, "maxItems": limits.max_files,
                                 "items": {"type": "string", "format": "binary"},
                                 "description": "one or several photos (JPEG, PNG, ...)"}}}}}}}


# What /openapi.json says of the errors of POST /api/caption: each is {"error": "..."}.
_ERROR_BODY = {"application/json": {"schema": {"type": "object", "required": ["error"],
                                               "properties": {"error": {"type": "string"}}}}}
_ERROR_RESPONSES = {
    400: {"description": "no field `image`, text instead of files, too many files, a malformed body",
          "content": _ERROR_BODY},
    413: {"description": "the body is over the upload limit", "content": _ERROR_BODY},
    415: {"description": "the body is not multipart/form-data", "content": _ERROR_BODY},
    422: {"description": "a file that is not a usable image, or a query parameter out of range",
          "content": _ERROR_BODY},
    503: {"description": "busy: try again after Retry-After seconds", "content": _ERROR_BODY,
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
}


class _SecurityHeaders:
    """Plain ASGI middleware adding SECURITY_HEADERS to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _DrainBody:
    """Plain ASGI middleware: before answering a request whose body is not read to its
    end (a 413, a 503, any early error), read and drop the rest of it, up to ``bound``
    bytes in all and DRAIN_SECONDS. A client that sends its whole body before reading
    (Python's urllib, which also asks for ``Connection: close``) would otherwise see
    the connection reset under it instead of the answer. A body beyond the bound is
    not read on: its answer goes out with ``Connection: close`` and the connection
    ends."""

    def __init__(self, app, bound):
        self.app, self.bound = app, bound

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = {"read": 0, "ended": False}

        async def counting_receive():
            message = await receive()
            body["read"] += len(message.get("body", b""))
            body["ended"] |= message["type"] == "http.disconnect" or not message.get("more_body", False)
            return message

        async def drain():
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.bound:
                return False
            while not body["ended"] and body["read"] <= self.bound:
                await counting_receive()
            return body["read"] <= self.bound

        async def send_after_drain(message):
            if message["type"] == "http.response.start" and not body["ended"]:
                try:
                    drained = await asyncio.wait_for(drain(), DRAIN_SECONDS)
                except asyncio.TimeoutError:
                    drained = False
                if not drained:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counting_receive, send_after_drain)


async def _read_photos(request, limits):
    """The request's files in field ``image`` as [(file name, label for errors,
    bytes)], the body read with the size limit counted chunk by chunk."""
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the photos as multipart/form-data in the field 'image' "
                            "(curl -F image=@photo.jpg ...)")
    too_large = (f"the upload is over the limit of {limits.max_bytes / MB:g} MB per request (all its "
                 f"photos together); send smaller or fewer photos")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise ApiError(413, too_large)

    async def body():
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_bytes:
                raise _TooLarge()
            yield chunk

    parser = MultiPartParser(request.headers, body(), max_files=limits.max_files, max_fields=16)
    try:
        form = await parser.parse()
    except _TooLarge:
        raise ApiError(413, too_large) from None
    except MultiPartException as e:
        if "too many files" in str(e).lower():
            raise ApiError(400, f"too many files: at most {limits.max_files} photos per request") from None
        raise ApiError(400, f"malformed multipart body: {e}") from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the upload ended") from None
    try:
        parts = form.getlist("image")
        if not parts:
            fields = sorted(set(form.keys()))
            raise ApiError(400, "missing the multipart field 'image' (send photos as -F image=@photo.jpg)"
                           + (f"; got only {', '.join(map(repr, fields))}" if fields else ""))
        photos = []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                raise ApiError(400, "the field 'image' must carry files (-F image=@photo.jpg), not text")
            name = (part.filename or "")[:200] or "unnamed"
            label = repr(name) + (f" (photo {i + 1} of {len(parts)})" if len(parts) > 1 else "")
            photos.append((name, label, await part.read()))
        return photos
    finally:
        await form.close()


class _Job:
    """One request's photos on their way through the batcher: bytes until a batch
    decodes them, then their results; the future ends when the last one is captioned
    or the first one fails. Its photos may be in batches of several workers, hence
    the lock."""

    def __init__(self, photos, kwargs):
        self.photos, self.kwargs = list(photos), kwargs
        self.options = tuple(sorted(kwargs.items()))  # requests with equal options decode together
        self.results, self.left = [None] * len(self.photos), len(self.photos)
        self.future, self.started, self._lock = Future(), None, threading.Lock()

    def take(self):
        """A batch takes one of its photos: False for a request that failed already or
        that its client gave up before any batch took it (nothing to do for it)."""
        with self._lock:
            if self.started is None:
                self.started = time.perf_counter()
                if not self.future.set_running_or_notify_cancel():
                    return False
            return not self.future.done()

    def fail(self, exc):
        with self._lock, contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            if not self.future.done():
                self.future.set_exception(exc)

    def finish(self, i, result):
        with self._lock:
            self.results[i], self.photos[i] = result, None
            self.left -= 1
            if self.left == 0 and not self.future.done():
                self.future.set_result((self.results, self.started, time.perf_counter()))


class _Batcher:
    """The captioning queue. A request adds its photos (still bytes) and awaits a
    future; ``limits.workers`` threads each take up to ``max_batch`` queued photos,
    from any requests, and caption them together: one encoder batch, then one decoding
    batch per set of decoding options (requests asking for different beams must not
    share a beam search). A batch waits at most ``batch_wait_ms`` after its first photo
    for more to come, and not at all once it is full or when no request is being read
    (``expect``, then ``submit(..., expected=True)``): at one client the wait would only
    add to every request's latency. Under load, photos queue while a batch is
    captioned and the next one takes them at once.

    Photos are decoded (``load_image``) by the batch, not by the request, so at most
    ``max_batch`` decoded photos per worker exist at a time, however many requests
    wait: a 10 MB JPEG can decode to hundreds of MB. A photo that fails to decode fails
    its own request only; an error in captioning a batch is retried request by request,
    so that it fails only the request that causes it.
    """

    def __init__(self, captioner, limits):
        self.captioner, self.limits = captioner, limits
        self._cond = threading.Condition()   # guards the queue, the threads and the stats
        self._collecting = threading.Lock()  # one worker gathers a batch at a time
        self._queue = collections.deque()    # (job, photo index)
        self._arriving = 0                   # requests admitted whose photos are still being read
        self._threads, self._stop = [], threading.Event()
        self._stats = {"count": 0, "photos": 0, "largest": 0}

    def stats(self):
        """Batches captioned since start, their photos, the largest batch."""
        with self._cond:
            return {**self._stats, "max_batch": self.limits.max_batch}

    def start(self):
        with self._cond:
            if self._threads:
                return
            self._stop = stop = threading.Event()  # a new one: threads of an earlier start keep theirs
            self._threads = [threading.Thread(target=self._work, args=(stop,), daemon=True,
                                              name=f"rnncap-caption-{i}") for i in range(self.limits.workers)]
            for t in self._threads:
                t.start()

    def close(self):
        """Stop the workers after the batch they are on; fail what is still queued."""
        with self._cond:
            self._stop.set()
            self._threads = []
            queued = [job for job, _ in self._queue]
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            job.fail(ApiError(503, "the server is shutting down; retry later", {"Retry-After": "5"}))

    def expect(self):
        """A request was admitted and its photos are being read: a gathering batch may
        wait for them. Ended by ``submit(..., expected=True)`` or ``unexpect``."""
        with self._cond:
            self._arriving += 1

    def unexpect(self):
        """An expected request will not be submitted (its body was refused)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()  # a batch waiting for it need not

    def submit(self, photos, kwargs, expected=False):
        """Queue a request's photos [(name, label, bytes)]; a concurrent Future of
        (results, start, end), or of the request's DataError. ``expected``: the request
        was announced by ``expect``."""
        job = _Job(photos, kwargs)
        with self._cond:
            # One step with the queueing, so a gathering batch never sees the request
            # neither arriving nor queued.
            self._arriving -= bool(expected)
            if job.photos:
                self.start()  # started by the app's lifespan; here too for an app used without it
                self._queue.extend((job, i) for i in range(len(job.photos)))
            self._cond.notify_all()
        if not job.photos:  # nothing to wait for (the app never sends none)
            job.take()
            job.future.set_result(([], job.started, job.started))
        return job.future

    def _work(self, stop):
        while True:
            with self._collecting:
                batch = self._gather(stop)
            if batch is None:
                return
            self._caption(batch)

    def _gather(self, stop):
        """Up to max_batch queued photos, or None once stopped."""
        limit, wait = self.limits.max_batch, self.limits.batch_wait_ms / 1000.0
        with self._cond:
            while True:
                while not self._queue and not stop.is_set():
                    self._cond.wait()
                if stop.is_set():
                    return None
                deadline = time.monotonic() + wait
                while (len(self._queue) < limit and not stop.is_set()
                       and (self._arriving > 0 or self.limits.batch_wait_always)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if stop.is_set():
                    return None
                batch = []
                while self._queue and len(batch) < limit:
                    job, i = self._queue.popleft()
                    if job.take():
                        batch.append((job, i))
                if batch:
                    return batch

    def _caption(self, batch):
        """Decode the batch's photos, then caption those that decoded."""
        from ..data.images import load_image

        decoded = []
        for job, i in batch:
            if job.future.done():  # an earlier photo of the request failed
                continue
            name, label, data = job.photos[i]
            t = time.perf_counter()
            try:
                image = load_image(data, max_pixels=self.limits.max_pixels, name=label)
            except DataError as e:  # the request fails whole, naming its first bad photo
                job.fail(e)
                continue
            decoded.append((job, i, image, _ms(time.perf_counter() - t)))
        decoded = [d for d in decoded if not d[0].future.done()]
        if not decoded:
            return
        jobs = list({id(d[0]): d[0] for d in decoded}.values())
        try:
            self._caption_decoded(decoded)
        except Exception as e:
            if len(jobs) == 1:
                jobs[0].fail(e)
                return
            for job in jobs:  # find the request at fault: each alone
                try:
                    self._caption_decoded([d for d in decoded if d[0] is job])
                except Exception as alone:
                    job.fail(alone)

    def _caption_decoded(self, decoded):
        """One encoder batch for [(job, index, image, decode ms)], one decoding batch
        per set of options; each photo's result handed to its job."""
        t = time.perf_counter()
        feats = self.captioner.features([image for _, _, image, _ in decoded])
        encode_s = time.perf_counter() - t
        groups = {}
        for row, (job, *_) in enumerate(decoded):
            groups.setdefault(job.options, []).append(row)
        done = []
        for rows in groups.values():
            t = time.perf_counter()
            part = feats if len(rows) == len(decoded) else feats[rows]
            captions = self.captioner.caption_details_from_features(part, **decoded[rows[0]][0].kwargs)
            caption_ms = _ms(encode_s + time.perf_counter() - t)
            for row, caps in zip(rows, captions):
                job, i, image, decode_ms = decoded[row]
                done.append((job, i, {"name": job.photos[i][0], "width": image.width, "height": image.height,
                                      "captions": [_caption_entry(c) for c in caps], "batch": len(decoded),
                                      "ms": {"decode": decode_ms, "caption": caption_ms}}))
        with self._cond:
            self._stats["count"] += 1
            self._stats["photos"] += len(decoded)
            self._stats["largest"] = max(self._stats["largest"], len(decoded))
        for job, i, result in done:
            job.finish(i, result)


def _caption_entry(c):
    """One caption for JSON: its words, log-probability and, from attention models,
    a grid of weights per word ((n_words, h, w) as nested lists)."""
    import numpy as np

    out = {"caption": c["caption"], "words": c["caption"].split(), "logprob": float(c["logprob"])}
    if c.get("attention") is not None:
        out["attention"] = np.round(np.asarray(c["attention"], dtype=np.float64), 4).tolist()
    return out


def _ms(seconds):
    return round(seconds * 1000.0, 2)


def _version():
    from .. import __version__

    return __version__


# ---- what a checkpoint is -----------------------------------------------------------

def decoding_defaults(captioner):
    """beam, n, length_norm and max_length a request gets when it names none: the
    captioner's own (``Captioner.decoding``: the checkpoint's), else the defaults of
    its ``caption_details``."""
    params = inspect.signature(captioner.caption_details).parameters
    out = {k: params[k].default for k in ("beam", "n", "length_norm", "max_length")
           if k in params and params[k].default is not inspect.Parameter.empty}
    if hasattr(captioner, "decoding"):
        out["beam"], out["length_norm"] = captioner.decoding()
    if out.get("max_length") is None and getattr(captioner, "max_length", None) is not None:
        out["max_length"] = int(captioner.max_length)
    return out


def describe_checkpoint(path, average=None):
    """What ``GET /api/model`` says: model type, cell, sizes, encoder, vocabulary,
    training data and the validation metrics stored with the checkpoint. Several paths
    (an ensemble): "model": "ensemble", how it averages, and "members", each described
    as one checkpoint."""
    from ..checkpoint import load_checkpoint

    if isinstance(path, (list, tuple)):
        if len(path) > 1:
            members = [describe_checkpoint(p) for p in path]
            return {"checkpoint": " + ".join(m["checkpoint"] for m in members), "model": "ensemble",
                    "model_class": "Ensemble", "ensemble": average, "vocab_size": members[0]["vocab_size"],
                    "warning": next((m["warning"] for m in members if m["warning"]), None),
                    "members": members}
        path = path[0]
    from ..data.synth import scenes_warning, trained_on_scenes

    ckpt = load_checkpoint(path)
    model_cfg = ckpt.configs.get("model") or {}
    m = ckpt.model
    synthetic = trained_on_scenes(ckpt.configs, ckpt.vocab)
    return {
        "checkpoint": os.path.basename(os.fspath(path)),
        "model": model_cfg.get("model") or ("attention" if hasattr(m, "attention_dim") else "h0"),
        "model_class": type(m).__name__,
        "cell": getattr(m, "cell_type", model_cfg.get("cell_type")),
        "hidden_dim": getattr(m, "hidden_dim", None),
        "wordvec_dim": getattr(m, "wordvec_dim", None),
        "vocab_size": len(ckpt.vocab),
        "encoder": {k: v for k, v in (ckpt.encoder or {}).items() if k in ("name", "pooling", "image_size")},
        "pca_dim": _pca_dim(ckpt.pca),
        "training_data": (ckpt.configs.get("data") or {}).get("captions") or None,
        "trained_on": "synthetic scenes" if synthetic else "photos",
        "warning": scenes_warning(len(ckpt.vocab)) if synthetic else None,
        "iteration": ckpt.train_state.get("iteration"),
        "val_metrics": _val_metrics(ckpt),
    }


def _pca_dim(pca):
    """The PCA's output size, or None: no transform, or standardisation alone (a
    transform with no components, as for spatial maps)."""
    components = None if pca is None else pca.get("components")
    return None if components is None else int(components.shape[1])


def _val_metrics(ckpt):
    """The validation numbers logged at this checkpoint's iteration (else the last)."""
    h = ckpt.history or {}
    its = list(h.get("val_iteration") or [])
    if not its:
        return {}
    it = ckpt.train_state.get("iteration")
    i = its.index(it) if it in its else len(its) - 1
    return {k: v[i] for k, v in h.items()
            if k.startswith("val_") and k != "val_iteration" and isinstance(v, list) and i < len(v)}


# ---- the command --------------------------------------------------------------------

def add_arguments(p):
    from ..cli import nonneg_float, positive_float, positive_int

    from .sample import add_checkpoint_arguments

    add_checkpoint_arguments(p, required=False, help=f"a checkpoint from `rnncap train` (default: "
                                                     f"{DEMO_CHECKPOINT}, made by `rnncap demo`)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; "
                        "0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=positive_float, default=Limits.max_bytes / MB,
                   help="largest request body in MB, all its photos together (default %(default)g)")
    p.add_argument("--max-files", type=positive_int, default=Limits.max_files,
                   help="most photos per request (default %(default)s)")
    p.add_argument("--max-pixels", type=positive_int, default=Limits.max_pixels,
                   help="most pixels per photo, checked before decoding (default %(default)s)")
    p.add_argument("--workers", type=positive_int, default=Limits.workers,
                   help="photos captioned at the same time (default %(default)s)")
    p.add_argument("--max-pending", type=positive_int, default=Limits.max_pending,
                   help="requests taken on at once, the captioning ones included; more get 503 "
                        "with Retry-After (default %(default)s)")
    p.add_argument("--max-batch", type=positive_int, default=Limits.max_batch,
                   help="most photos captioned together, from any requests: one encoder batch "
                        "(default %(default)s; 1 = photo by photo)")
    p.add_argument("--batch-wait-ms", type=nonneg_float, default=Limits.batch_wait_ms,
                   help="how long a batch waits after its first photo for more, while other "
                        "requests are being received (default %(default)g ms)")
    p.add_argument("--batch-wait-always", action="store_true",
                   help="wait the whole --batch-wait-ms even when no other request is being "
                        "received (for clients that send in bursts; costs a lone client that long)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; "
                        "repeatable (default: CORS off)")
    p.add_argument("--weights", help="encoder weights file, for encoders that need one (vgg16)")
    p.add_argument("--access-log", action="store_true", help="log every request")


def run(args):
    import uvicorn


    from .sample import captioner_from_args

    paths = args.checkpoint or [DEMO_CHECKPOINT]
    for path in paths:
        if not os.path.isfile(path):
            if args.checkpoint:
                raise CheckpointError(f"{path}: no such checkpoint file")
            raise CheckpointError(f"no checkpoint given and none at {DEMO_CHECKPOINT}: run `rnncap demo` "
                                  f"to make one, or pass --checkpoint runs/.../best.npz")
    if args.max_pending < args.workers:
        raise RnncapError(f"--max-pending ({args.max_pending}) must be at least --workers ({args.workers})")
    limits = limits_from_args(args)
    sock = _listen(args.host, args.port)
    captioner = captioner_from_args(args, paths)
    app = create_app(captioner, info=describe_checkpoint(paths, average=captioner.decode.ensemble),
                     limits=limits, cors_origins=args.cors_origin)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"rnncap serve: {' + '.join(paths)} at {url}  (Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="info" if args.access_log else "warning",
                            access_log=args.access_log, timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then passed Ctrl-C on
        pass
    finally:
        sock.close()
    print("rnncap serve: stopped", file=sys.stderr, flush=True)
    return 0


def limits_from_args(args):
    """The ``Limits`` that the command's flags ask for."""
    return Limits(max_bytes=int(args.max_upload_mb * MB), max_files=args.max_files, max_pixels=args.max_pixels,
                  workers=args.workers, max_pending=args.max_pending, max_batch=args.max_batch,
                  batch_wait_ms=args.batch_wait_ms, batch_wait_always=args.batch_wait_always)


def _listen(host, port):
    """A listening socket, or one line saying why there is none."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
    except socket.gaierror as e:
        raise RnncapError(f"--host {host}: not an address of this machine ({e.strerror})")
    # proto must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket does, and with it on, every request after the first on a
    # kept-alive connection waited 40 ms for the client's delayed ACK (docs/serving.md).
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise RnncapError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                          f"or --host") from None
    sock.set_inheritable(True)
    return sock

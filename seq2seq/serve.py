"""`seq2seq serve`: an HTTP translation service on FastAPI and uvicorn, batching concurrent requests.

    POST /translate  {"text": ["...", ...] or "...", "beam": 5, "n_best": 1}
                  -> {"translations": ["...", ...], "backend": "ctranslate2 int8"}
                     (n_best > 1: a list of {"text", "score"} per source, best first)
                     optional, one entry per source (for a single "text", the entry itself): "prefix" (a string or
                     null: the output starts with it), "include" and "exclude" (lists of phrases it must and must
                     not contain; `seq2seq.guides`); with a glossary, a source containing a source term must
                     contain its target term too, as if it were in "include"
    GET  /health  -> {"status": "ok", "backend": ..., "queued": sources waiting, "max_queue": ...}

FastAPI with uvicorn rather than LitServe: the service is one model in one process, and what it needs beyond HTTP is
a batching queue, which is a few lines of asyncio here; LitServe's worker processes and request loop would sit
between the two with nothing to add on a CPU. Requests wait up to `max_wait_ms` for others to share a batch of at most
`max_batch` sources (requests with other decoding settings share a wait, not a batch); one thread decodes. A bad
request (malformed JSON, invalid Unicode, a wrong type, an empty or over-long source, too many sources, too much
search work, too big a body, constraints longer than the model writes) gets a 4xx with a message saying what is wrong
and where, before it joins a batch; if decoding a batch still fails, its requests are decoded one by one, so only
the failing one gets the 500. When `max_queue` sources wait already, a request gets 503 with `Retry-After`; a
request whose client disconnects is dropped from the queue. On SIGINT or SIGTERM uvicorn stops taking connections,
lets the requests in flight finish (they are answered), then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from seq2seq.errors import ConfigError, DataError
from seq2seq.guides import Guide, Term
from seq2seq.requests import Limits, request_guides, request_problem
from seq2seq.translate import Translator

log = logging.getLogger(__name__)
DEFAULT_LIMITS = Limits()


@dataclass
class _Job:
    sources: list[str]
    beam: int | None
    n_best: int
    guides: list[Guide] | None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    released: bool = False  # its sources no longer count as queued


class Batcher:
    """Collects queued jobs into batches and decodes them on one worker thread."""

    def __init__(self, translator: Translator, limits: Limits) -> None:
        self.translator, self.limits = translator, limits
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.queued = 0
        self._by_beam: dict[int | None, Translator] = {None: translator}

    def submit(self, sources: list[str], beam: int | None, n_best: int,
               guides: list[Guide] | None = None) -> asyncio.Future | None:
        """Queue a request; its future holds the outputs. None when the queue is full."""
        if self.queued + len(sources) > self.limits.max_queue:
            return None
        job = _Job(sources, beam, n_best, guides)
        self.queued += len(sources)
        job.done.add_done_callback(lambda done: self._release(job) if done.cancelled() else None)
        self.queue.put_nowait(job)
        return job.done

    def _release(self, job: _Job) -> None:
        """The job's sources leave the queue count: decoded, failed, or abandoned by its client (at once)."""
        if not job.released:
            job.released = True
            self.queued -= len(job.sources)

    async def _next(self) -> _Job:
        """The next queued job whose client still waits for it (a cancelled one leaves the queue here)."""
        while (job := await self.queue.get()).done.cancelled():
            pass
        return job

    async def _gather(self) -> list[_Job]:
        jobs = [await self._next()]
        size, loop = len(jobs[0].sources), asyncio.get_running_loop()
        deadline = loop.time() + self.limits.max_wait_ms / 1000
        while size < self.limits.max_batch and (left := deadline - loop.time()) > 0:
            try:
                job = await asyncio.wait_for(self._next(), left)
            except TimeoutError:
                break
            jobs.append(job)
            size += len(job.sources)
        return jobs

    def _decode(self, beam: int | None, n_best: int, sources: list[str], guides: list[Guide] | None) -> list[Any]:
        if beam not in self._by_beam:
            self._by_beam[beam] = self.translator.with_decoding(beam=beam)
        translator = self._by_beam[beam]
        if n_best == 1:
            return translator.translate(sources, guides)
        return [[{"text": text, "score": score} for score, text in found]
                for found in translator.n_best(sources, n_best, guides)]

    async def _decode_group(self, group: list[_Job]) -> None:
        """Decode jobs of one beam and n_best together; if that fails, each alone, so only a failing one fails."""
        sources = [s for job in group for s in job.sources]
        guides = None  # requests without guides share a batch with those with them, as Guide()s
        if any(job.guides for job in group):
            guides = [g for job in group for g in (job.guides or [Guide()] * len(job.sources))]
        try:
            outputs = []  # in chunks of at most max_batch sources: work whose clients all left stops between them
            for at in range(0, len(sources), self.limits.max_batch):
                if all(job.done.cancelled() for job in group):
                    return
                chunk = slice(at, at + self.limits.max_batch)
                outputs += await asyncio.to_thread(self._decode, group[0].beam, group[0].n_best, sources[chunk],
                                                   guides[chunk] if guides else None)
        except Exception as err:
            if len(group) > 1:
                log.warning("decoding a batch of %d requests failed (%s); decoding them one by one", len(group),
                            err)
                for job in group:
                    await self._decode_group([job])
                return
            log.exception("decoding a request of %d sources failed", len(sources))
            if not group[0].done.done():  # its request may have been cancelled meanwhile
                group[0].done.set_exception(err)
            return
        at = 0
        for job in group:
            if not job.done.done():
                job.done.set_result(outputs[at : at + len(job.sources)])
            at += len(job.sources)

    async def run(self) -> None:
        while True:
            jobs = await self._gather()
            key = lambda job: (job.beam or 0, job.n_best)  # noqa: E731
            for _, grouped in itertools.groupby(sorted(jobs, key=key), key=key):
                grouped = list(grouped)
                try:
                    group = [job for job in grouped if not job.done.cancelled()]  # clients gone meanwhile
                    if group:
                        await self._decode_group(group)
                finally:
                    for job in grouped:
                        self._release(job)


async def _body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None when it is over `limit` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body is read: what the server receives next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(request: Request, done: asyncio.Future, backend: str) -> JSONResponse:
    """The outputs of a queued request once decoded; if its client disconnects first, it leaves the queue."""
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not done.done():  # nobody reads the answer: the batcher skips it
        done.cancel()
        return JSONResponse({"error": "the client disconnected"}, status_code=499)
    if (err := done.exception()) is not None:
        return JSONResponse({"error": f"decoding failed: {type(err).__name__}: {err}"}, status_code=500)
    return JSONResponse({"translations": done.result(), "backend": backend})


def create_app(translator: Translator, limits: Limits = DEFAULT_LIMITS, glossary: Sequence[Term] = ()) -> FastAPI:
    """The FastAPI application serving `translator`; `glossary`'s terms constrain every request's sources (a target
    term the model cannot spell is an error here, not in the requests whose sources hold its source term)."""
    translator.check_glossary(glossary)
    batcher = Batcher(translator, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="seq2seq", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": translator.backend.name, "queued": batcher.queued,
                "max_queue": limits.max_queue}

    @app.post("/translate")
    async def translate(request: Request) -> JSONResponse:
        body = await _body(request, limits.max_body)
        if body is None:
            return error(413, f"the body is over {limits.max_body} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error(400, f"the body is not JSON: {err}")
        if (problem := request_problem(data, limits, translator.decoder.spec.beam)) is not None:
            return error(*problem)
        texts = [data["text"]] if isinstance(data["text"], str) else data["text"]
        try:
            translator.encode(texts)  # too many tokens for the model: this request's error alone
            guides = request_guides(translator, data, texts, glossary)
        except DataError as err:
            return error(422, str(err))
        done = batcher.submit(texts, data.get("beam"), data.get("n_best") or 1, guides)
        if done is None:
            return JSONResponse({"error": f"the server has {batcher.queued} sources queued (at most "
                                          f"{limits.max_queue}); try again shortly"},
                                status_code=503, headers={"Retry-After": "1"})
        return await _answer(request, done, translator.backend.name)

    return app


def _socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port`, or a ConfigError saying why it cannot be (before anything is served)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"`host={host}` cannot be resolved ({err}); give an address or a known host name") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; choose another `port=` (or `host=`)"
                          ) from None
    return sock


def _server(translator: Translator, limits: Limits, glossary: Sequence[Term]) -> uvicorn.Server:
    config = uvicorn.Config(create_app(translator, limits, glossary), log_level="info", timeout_graceful_shutdown=60,
                            access_log=False)
    return uvicorn.Server(config)


def run(translator: Translator, limits: Limits, host: str, port: int, glossary: Sequence[Term] = ()) -> None:
    """Serve until SIGINT or SIGTERM; requests in flight are answered before it stops."""
    sock = _socket(host, port)
    server = _server(translator, limits, glossary)
    log.info("serving %s on http://%s:%d (POST /translate, GET /health)%s", translator.backend.name, host,
             sock.getsockname()[1], f" with a glossary of {len(glossary)} terms" if glossary else "")
    server.run(sockets=[sock])


@contextlib.contextmanager
def background(translator: Translator, limits: Limits = DEFAULT_LIMITS, host: str = "127.0.0.1",
               glossary: Sequence[Term] = ()) -> Iterator[tuple[Any, str]]:
    """A server on a free port in a thread, for tests: (server, base URL). Leaving the block shuts it down as a
    signal would (in-flight requests are answered first)."""
    server = _server(translator, limits, glossary)
    sock = _socket(host, 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        threading.Event().wait(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()

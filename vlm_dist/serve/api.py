"""The OpenAI-compatible HTTP API over an Engine: /v1/models, /v1/chat/completions, /health.

    app = create_app("runs/sft/export", ServeConfig(api_key="secret"))   # or create_app(engine)
    uvicorn.run(app, host="127.0.0.1", port=8000)

A request is checked and turned into a Job here (content parts in order, each image_url an
image slot at its place, each video_url -- vLLM's part name -- a video's; bytes read by
serve.media and decoded by the export's VisionTower.decode / decode_video, the cache's decoders;
a tiled export's images tiled and a video's frames sampled as its training cache did) before it
is queued, so a bad request is refused at
once with OpenAI's error JSON and never reaches the model. Replies come back whole, or as
server-sent events (`chat.completion.chunk` objects, then `data: [DONE]`). A client that
disconnects cancels its job: generation of its row stops and its queue slot is freed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlm_dist.contract.images import ImageError
from vlm_dist.contract.video import VideoError
from vlm_dist.serve.engine import IMAGE_PART, VIDEO_PART, Engine, Job, SamplingParams, ServeConfig
from vlm_dist.serve.errors import RequestError
from vlm_dist.serve.media import MediaLimits, read_media_url

log = logging.getLogger("vlm_dist.serve")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""OpenAI roles -> the template's roles (a developer message is a system message)."""
MAX_STOP = 4
MAX_STOP_CHARS = 256        # the hold-back of a stop string scans its prefixes every token: keep it short


# ---------------------------------------------------------------------------------------------
# Request -> Job

def _bad(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, code=code, param=param)


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise _bad(f"{key} must be {what} in [{lo}, {hi}], got {value!r}", param=key)
    return value


def sampling_params(body: dict) -> tuple[SamplingParams, int | None]:
    """The sampling settings of a request, and its max_tokens (None: not given)."""
    if body.get("n", 1) != 1:
        raise _bad(f"n must be 1 (this server returns one choice), got {body.get('n')!r}", param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise _bad(f"{key} is not supported (leave it out or 0)", param=key)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs are not supported", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools / function calling are not supported", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format other than {\"type\": \"text\"} is not supported", param="response_format")
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise _bad(f"{key} must be a positive integer, got {max_tokens!r}", param=key)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise _bad(f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                   f"{MAX_STOP} of them", param="stop")
    params = SamplingParams(max_tokens=0,
                            temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                            top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
                            seed=_number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True),
                            stop=stop)
    return params, max_tokens


# content part type -> (what the error calls it, its marker in the parsed turns)
MEDIA_PARTS = {"image_url": ("images", IMAGE_PART), "video_url": ("videos", VIDEO_PART)}


def parse_messages(messages, with_videos: bool = False):
    """Turns with content parts (text, IMAGE_PART, VIDEO_PART) and the image URLs in order, with
    where each is; with_videos: (turns, image URLs, video URLs)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", param="messages")
    turns, urls, video_urls = [], [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or msg["role"] not in ROLES:
            raise _bad(f"{where}: a message is {{role: system|developer|user|assistant, content}}",
                       param="messages")
        role, content = ROLES[msg["role"]], msg.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of content parts", param="messages")
        parts: list = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if parts and isinstance(parts[-1], str):
                    parts[-1] += part["text"]          # adjacent text parts are one text
                else:
                    parts.append(part["text"])
            elif kind in MEDIA_PARTS:
                noun, marker, found = MEDIA_PARTS[kind] + ((urls, video_urls)[kind == "video_url"],)
                if role != "user":
                    raise _bad(f"{at}: {noun} go in user messages, not {msg['role']}", param="messages")
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                found.append((url, f"{at}.{kind}"))
                parts.append(marker)
            else:
                raise _bad(f"{at}: unsupported content part {str(part)[:80]}; this server takes "
                           "{type: text, text}, {type: image_url, image_url: {url}} and "
                           "{type: video_url, video_url: {url}}", param="messages")
        turns.append({"role": role, "content": parts})
    if turns[-1]["role"] != "user":
        raise _bad("the last message must be a user message (the reply to it is generated)", param="messages")
    return (turns, urls, video_urls) if with_videos else (turns, urls)


class Handler:
    """Turns request bodies into queued jobs for one engine."""

    def __init__(self, engine: Engine):
        self.engine, self.config = engine, engine.config
        self.limits = MediaLimits(max_bytes=self.config.max_image_bytes, fetch_timeout=self.config.fetch_timeout,
                                  local_root=self.config.allowed_local_media_path)
        self.video_limits = MediaLimits(max_bytes=self.config.max_video_bytes,
                                        fetch_timeout=self.config.fetch_timeout,
                                        local_root=self.config.allowed_local_media_path, kind="video",
                                        flag="--max-video-bytes")

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("model is required (see GET /v1/models)", param="model")
        if model != self.engine.model_name:
            raise RequestError(404, f"the model {model!r} does not exist; this server serves "
                                    f"{self.engine.model_name!r}", code="model_not_found", param="model")

    def job(self, body: dict, on_event) -> Job:
        """Check a chat completion request (a JSON object), read and decode its images and videos;
        the job to submit."""
        self.check_model(body)
        params, max_tokens = sampling_params(body)
        turns, urls, video_urls = parse_messages(body.get("messages"), with_videos=True)
        limit = self.config.limit_mm_per_prompt
        if len(urls) > limit:
            raise _bad(f"{len(urls)} images in this request; at most {limit} are allowed "
                       "(--limit-mm-per-prompt)", param="messages", code="too_many_images")
        if video_urls and "video" not in self.engine.generator.media_tokens:
            raise _bad(f"{video_urls[0][1]}: this model takes no video (it has no video connector; "
                       "it was not trained with model.video)", param="messages", code="video_unsupported")
        if len(video_urls) > self.config.limit_video_per_prompt:
            raise _bad(f"{len(video_urls)} videos in this request; at most {self.config.limit_video_per_prompt} "
                       "are allowed (--limit-mm-per-prompt video=N)", param="messages", code="too_many_videos")
        images = [self.decode(*read_media_url(url, self.limits, where), where) for url, where in urls]
        videos = [self.decode_video(*read_media_url(url, self.video_limits, where), where)
                  for url, where in video_urls]
        views, layouts = self.engine.generator.media_views(images, videos)
        ids = self.engine.prompt_ids(turns, layouts)
        params.max_tokens = self.engine.check_length(len(ids), max_tokens)
        return Job(ids, views, params, on_event)

    def decode_video(self, data: bytes, name: str, where: str):
        try:
            return self.engine.generator.decode_video(data, name=name, max_bytes=self.config.max_video_bytes,
                                                      max_pixels=self.config.max_image_pixels)
        except VideoError as e:
            if e.reason.startswith("too large"):
                raise RequestError(413, f"{where}: {e.reason} (--max-video-bytes)", code="video_too_large",
                                   param="messages") from None
            raise _bad(f"{where}: cannot use this video: {e.reason}", param="messages",
                       code="invalid_video") from None

    def decode(self, data: bytes, name: str, where: str):
        try:
            return self.engine.tower.decode(data, name=name, max_pixels=self.config.max_image_pixels)
        except ImageError as e:
            if e.reason.startswith("decompression bomb"):
                raise RequestError(413, f"{where}: {e.reason} (--max-image-pixels)", code="image_too_large",
                                   param="messages") from None
            raise _bad(f"{where}: cannot use this image: {e.reason}", param="messages",
                       code="invalid_image") from None


# ---------------------------------------------------------------------------------------------
# The app

def create_app(model, config: ServeConfig | None = None, device: str | None = None, dtype: str | None = None):
    """The FastAPI app serving `model`: an export directory (loaded now) or a running Engine.

    An app that loaded its own engine closes it (stops the worker) when the server shuts down.
    """
    owned = not isinstance(model, Engine)
    engine = Engine.from_export(str(model), config, device=device, dtype=dtype) if owned else model
    handler = Handler(engine)
    cfg = engine.config

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owned:
            engine.close()

    app = FastAPI(title="vlm-serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(RequestError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):   # genuine bugs only: every refusal is a RequestError
        log.exception("unexpected error handling %s %s", request.method, request.url.path)
        return JSONResponse(RequestError(500, f"internal error: {type(exc).__name__}: {exc}").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send `Authorization: Bearer KEY` "
                                    "with the server's --api-key", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "vlm_dist", "max_model_len": engine.max_model_len}]}

    # images and videos arrive base64-encoded (4/3 of their bytes), plus the text of the conversation
    max_body = (cfg.limit_mm_per_prompt * (cfg.max_image_bytes * 4 // 3 + 1024) + (8 << 20)
                + (cfg.limit_video_per_prompt * (cfg.max_video_bytes * 4 // 3 + 1024)
                   if "video" in engine.generator.media_tokens else 0))

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise RequestError(413, f"request body of {declared} bytes; at most {max_body} are read "
                                    "(--limit-mm-per-prompt images of --max-image-bytes and videos of "
                                    "--max-video-bytes, plus text)",
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise RequestError(413, f"request body over {max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not JSON ({e})") from None
        except RecursionError:
            raise _bad("the request body is JSON nested too deeply") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await read_body(request)
        engine.check_capacity()   # before reading any image; submit checks again
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        stream, options = body.get("stream") or False, body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise _bad("stream must be true or false, stream_options an object", param="stream")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(event):   # called from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:   # the event loop is gone (shutdown)
                pass

        job = await run_in_threadpool(handler.job, body, on_event)
        engine.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            usage_too = bool(options.get("include_usage"))
            return StreamingResponse(_stream(job, events, rid, created, usage_too),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = ""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "delta":
                    text += value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            if not job.done:
                job.cancel()
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": value, "logprobs": None}],
                "usage": usage(job)}

    def chunk(rid, created, delta, finish=None) -> str:
        return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": engine.model_name,
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                   "logprobs": None}]}) + "\n\n"

    async def _stream(job: Job, events: asyncio.Queue, rid: str, created: int, usage_too: bool):
        try:
            yield chunk(rid, created, {"role": "assistant", "content": ""})
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield chunk(rid, created, {"content": value})
                elif kind == "error":
                    log.error("generation failed mid-stream: %s", value)
                    yield "data: " + json.dumps(RequestError(500, f"internal error: {value}").body()) + "\n\n"
                    break
                else:
                    yield chunk(rid, created, {}, finish=value)
                    if usage_too:
                        yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk",
                                                     "created": created, "model": engine.model_name,
                                                     "choices": [], "usage": usage(job)}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:   # also when the client disconnected: stop its row, free its slot
            if not job.done:
                job.cancel()

    return app


def usage(job: Job) -> dict:
    n_prompt, n_new = len(job.prompt_ids), len(job.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def serve(model, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          device: str | None = None, dtype: str | None = None, log_level: str = "info") -> None:
    """Load `model` (an export directory or an Engine) and serve it until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, config, device, dtype), host=host, port=port, log_level=log_level)

"""The HTTP API (FastAPI): OpenAI's `POST /v1/audio/speech`, voices, models, health, metrics and the web page.

    POST /v1/audio/speech   {"model", "input", "voice", "response_format": wav|pcm|flac|mp3|opus, "speed",
                             "stream_format": audio|sse} -> audio that streams as the engine makes it
    GET  /v1/models         the served model (and the OpenAI names it also answers to)
    GET  /v1/voices         saved voices;  POST /v1/voices (multipart: file, text, name) clones a new one
    GET  /health            GET /metrics (Prometheus)            GET /  the web page

A speech request is checked completely before it reaches the engine, and its response starts only when its
first audio exists, so every problem known before the first byte gets its own status: 400 (what to fix),
401 (API key), 404 (model), 409 (voice name taken), 429 + Retry-After (queue full), 504 (deadline). A client
that goes away mid-stream cancels its request, which frees its KV slot at the engine's next turn.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from voxlm.data.dataset import Preprocess
from voxlm.data.text import normalize_text
from voxlm.serve.backends import Backend
from voxlm.serve.engine import Audio, Done, Engine, Failed, QueueFull, SpeechRequest
from voxlm.serve.formats import (
    ENCODED,
    MEDIA_TYPES,
    STREAMED,
    SpeedChanger,
    available_formats,
    encode_whole,
    to_pcm16,
    wav_header,
)
from voxlm.serve.metrics import ServeMetrics
from voxlm.speechlm.generate import frame_limit
from voxlm.speechlm.sequences import generation_start, tts_prompt
from voxlm.speechlm.voices import (
    Voice,
    check_name,
    decoding_voice,
    encode_voice,
    list_voices,
    load_reference_audio,
    save_voice,
    voice_for_codec,
)

log = logging.getLogger("voxlm.serve")
STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class ApiSettings:
    api_key: str | None = None                # when set, /v1/* needs "Authorization: Bearer <key>"
    model_aliases: list[str] = field(default_factory=lambda: ["tts-1", "tts-1-hd", "gpt-4o-mini-tts"])
    max_input_chars: int = 4096
    request_timeout_seconds: float = 120.0    # a stream still running after this ends (504 if no audio yet)
    retry_after_seconds: int = 1
    base_seconds: float = 2.0                 # the length guard (voxlm.speechlm.generate.frame_limit)
    seconds_per_text_token: float = 0.5
    min_speed: float = 0.25
    max_speed: float = 4.0
    voices_dir: str = "voices"                # where POST /v1/voices saves
    max_voice_upload_bytes: int = 20_000_000
    min_voice_seconds: float = 0.5
    max_voice_seconds: float = 20.0
    voice_preprocess: dict[str, Any] = field(default_factory=dict)  # voxlm.data.dataset.Preprocess


class StreamAborted(Exception):
    """A stream that cannot finish (deadline, engine error) after its 200 went out."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, so the openai package raises its matching exception with our message."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class VoiceBook:
    """Saved voices by name, from several folders (the server's own first, then the artifact's)."""

    def __init__(self, dirs: list[Path], writable: Path, backend: Backend) -> None:
        self.dirs = [writable, *[d for d in dirs if d != writable]]
        self.writable = writable
        self.backend = backend
        self.codec_id = backend.codec.code_fingerprint()  # hashed once, not once per voice
        # By folder: (the voice, what a voice codec decodes it in, or None), or None for a voice this codec
        # cannot serve.
        self._cache: dict[str, tuple[Voice, Tensor | None] | None] = {}

    def names(self) -> list[str]:
        """The voices this server's codec reads: a voice of another codec is encoded again from its
        reference.wav, and left out (with a warning) when it has none."""
        return sorted({name for d in self.dirs for name in list_voices(d) if self._load(d, name)})

    def get(self, name: str) -> Voice:
        return self.lookup(name)[0]

    def lookup(self, name: str) -> tuple[Voice, Tensor | None]:
        """(the voice, the voice [1, voice_dim] a codec with a voice encoder decodes its speech in: from its
        reference.wav, computed once; None for a codec that decodes codes alone)."""
        for d in self.dirs:
            entry = self._load(d, name)
            if entry is not None:
                return entry
        known = ", ".join(self.names()) or "none yet: add one with POST /v1/voices"
        raise ApiError(400, f"unknown voice '{name}'; voices: {known}", "voice")

    def _load(self, folder: Path, name: str) -> tuple[Voice, Tensor | None] | None:
        key = str(folder / name)
        if key not in self._cache:
            if not (folder / name / "voice.json").is_file():
                return None
            codec, encoder = self.backend.codec, self.backend.encoder
            try:
                reference = load_reference_audio(folder / name, folder, codec.sample_rate)
                voice = voice_for_codec(Voice.load(folder / name), codec, reference, encoder, self.codec_id)
                entry = voice, decoding_voice(codec, reference, encoder)
            except ValueError as error:
                log.warning("voice %s is not served: %s", key, error)
                entry = None
            self._cache[key] = entry
        return self._cache[key]

    def describe(self, name: str) -> dict[str, Any]:
        voice = self.get(name)
        return {"id": voice.name, "object": "voice", "speaker": voice.speaker, "transcript": voice.text,
                "duration_seconds": round(voice.duration, 3)}


def create_app(backend: Backend, engine: Engine, settings: ApiSettings, metrics: ServeMetrics) -> FastAPI:
    app = FastAPI(title="voxlm", description="Streaming speech synthesis, OpenAI-compatible")
    voices = VoiceBook(backend.voices_dirs, Path(settings.voices_dir), backend)
    app.state.voices = voices
    formats = available_formats()
    models = [backend.model_id, *settings.model_aliases]
    sample_rate = backend.codec.sample_rate
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        metrics.responses.labels(request.url.path, str(error.status)).inc()
        return error_response(error.status, error.message, error.param, error.headers)

    def authorize(request: Request) -> None:
        """A dependency of every /v1 route (not a middleware: Starlette's http middleware re-streams bodies,
        which would hide a stream that breaks off, and costs time on every chunk)."""
        given = request.headers.get("authorization", "")
        if settings.api_key and given != f"Bearer {settings.api_key}":
            why = "missing" if not given else "wrong"
            raise ApiError(401, f"{why} API key: send the header 'Authorization: Bearer <key>'")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": backend.name, "model": backend.model_id,
                "sample_rate": sample_rate, **engine.stats()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": started,
                                            "owned_by": "voxlm"} for m in models]}

    @v1.get("/voices")
    async def get_voices() -> dict[str, Any]:
        return {"object": "list", "data": [voices.describe(name) for name in voices.names()]}

    @v1.post("/voices", status_code=201)
    async def add_voice(request: Request) -> dict[str, Any]:
        form = await _form(request, settings.max_voice_upload_bytes)
        name, text, upload = form.get("name"), form.get("text"), form.get("file")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "field 'name' is required: the new voice's name", "name")
        try:
            name = check_name(name.strip())
        except ValueError as error:
            raise ApiError(400, str(error), "name") from None
        if name in voices.names():
            raise ApiError(409, f"a voice named '{name}' exists: choose another name", "name")
        transcript = normalize_text(text) if isinstance(text, str) else ""
        if not transcript:
            raise ApiError(400, "field 'text' is required: the transcript of the uploaded recording", "text")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "field 'file' is required: a recording (wav, flac, ogg, mp3)", "file")
        data = await upload.read()
        voice = await run_in_threadpool(_encode_upload, data, Path(upload.filename or "upload.wav").suffix,
                                        transcript, name)
        metrics.responses.labels("/v1/voices", "201").inc()
        return voices.describe(voice)

    def _encode_upload(data: bytes, suffix: str, transcript: str, name: str) -> str:
        with tempfile.NamedTemporaryFile(suffix=suffix or ".wav") as file:
            file.write(data)
            file.flush()
            try:
                voice, audio = encode_voice(backend.codec, file.name, transcript, name,
                                            preprocess=Preprocess(**settings.voice_preprocess),
                                            encoder=backend.encoder)
            except Exception as error:  # soundfile/libsndfile: any unreadable upload
                raise ApiError(400, f"could not read the uploaded audio ({error}): send a wav, flac, ogg "
                               "or mp3 file", "file") from None
        if not settings.min_voice_seconds <= voice.duration <= settings.max_voice_seconds:
            raise ApiError(400, f"the recording lasts {voice.duration:.1f} s after trimming silence: send "
                           f"{settings.min_voice_seconds:g} to {settings.max_voice_seconds:g} s of speech",
                           "file")
        save_voice(voice, voices.writable, audio)
        return voice.name

    @v1.post("/audio/speech")
    async def speech(request: Request) -> Response:
        body = await _json_object(request)
        job = _speech_job(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        item = SpeechRequest(job["prompt"], job["max_frames"], lambda e: loop.call_soon_threadsafe(
            events.put_nowait, e), time.monotonic() + settings.request_timeout_seconds, id=uuid.uuid4().hex,
            playback_rate=job["speed"], feeds=job["feeds"], voice=job["voice"])
        try:
            engine.submit(item)
        except QueueFull as error:
            raise ApiError(429, f"the server is at capacity ({error}): retry after "
                           f"{settings.retry_after_seconds} s", headers={
                               "Retry-After": str(settings.retry_after_seconds)}) from None
        try:
            first = await events.get()
        except asyncio.CancelledError:
            item.cancel()
            engine.wake()
            raise
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message)
        metrics.responses.labels("/v1/audio/speech", "200").inc()
        stream = _stream(first, events, item, job)
        media = "text/event-stream" if job["sse"] else MEDIA_TYPES[job["format"]]
        return StreamingResponse(stream, media_type=media, headers={"X-Request-Id": item.id})

    async def _stream(first: Audio | Done, events: asyncio.Queue, item: SpeechRequest,
                      job: dict[str, Any]) -> AsyncIterator[bytes]:
        fmt, sse = job["format"], job["sse"]
        speed = SpeedChanger(job["speed"], sample_rate) if job["speed"] != 1.0 else None
        whole: list[np.ndarray] = []
        header = wav_header(sample_rate) if fmt == "wav" else b""
        event: Audio | Done | Failed = first
        completed = False
        try:
            while True:
                final = not isinstance(event, Audio)
                if isinstance(event, Failed) and not sse:
                    # The status went out with the first audio: drop the connection without the final
                    # chunk, so that the client sees an incomplete body rather than a short, clean one.
                    completed = True  # ended by the engine, not by the client
                    raise StreamAborted(f"request {item.id} ended early: {event.message}")
                audio = event.samples if isinstance(event, Audio) else np.zeros(0, np.float32)
                if speed is not None:
                    audio = speed.push(audio, final=final)
                if fmt in ENCODED:
                    whole.append(audio)
                    payload = encode_whole(np.concatenate(whole), sample_rate, fmt) if final else b""
                else:
                    payload = header + to_pcm16(audio) if len(audio) or header else b""
                    header = b""
                if payload:
                    yield _sse_delta(payload) if sse else payload
                if final:
                    if sse:
                        yield _sse_done(event)
                    completed = True
                    return
                event = await events.get()
        finally:
            if not completed:  # the client went away (or the server is stopping): free the slot now
                item.cancel()
                engine.wake()
                metrics.disconnects.inc()

    def _speech_job(body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if model is not None and model not in models:
            raise ApiError(404, f"model '{model}' is not served here; models: {', '.join(models)}", "model")
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "'input' must be a non-empty string: the text to speak", "input")
        if len(text) > settings.max_input_chars:
            raise ApiError(400, f"'input' has {len(text)} characters, more than {settings.max_input_chars}: "
                           "split the text into several requests", "input")
        normalized = normalize_text(text)
        if not normalized:
            raise ApiError(400, "'input' has nothing speakable after normalization", "input")
        fmt = body.get("response_format", "wav")
        if fmt not in formats:
            raise ApiError(400, f"response_format '{fmt}' is not available; choose one of: "
                           f"{', '.join(formats)}", "response_format")
        stream_format = body.get("stream_format", "audio")
        if stream_format not in ("audio", "sse"):
            raise ApiError(400, f"stream_format must be 'audio' or 'sse', got {stream_format!r}",
                           "stream_format")
        if stream_format == "sse" and fmt not in STREAMED:
            raise ApiError(400, f"stream_format 'sse' carries {' or '.join(STREAMED)}, not {fmt}",
                           "response_format")
        speed = body.get("speed", 1.0)
        if (not isinstance(speed, int | float) or isinstance(speed, bool) or not math.isfinite(speed)
                or not settings.min_speed <= speed <= settings.max_speed):
            raise ApiError(400, f"speed must be a number from {settings.min_speed} to {settings.max_speed}, "
                           f"got {speed!r}", "speed")
        voice_name = body.get("voice")
        if isinstance(voice_name, dict):  # the newer OpenAI shape: {"id": "..."}
            voice_name = voice_name.get("id")
        if not isinstance(voice_name, str) or not voice_name:
            raise ApiError(400, f"'voice' is required; voices: {', '.join(voices.names()) or 'none yet'}",
                           "voice")
        voice, decoding_voice_vector = voices.lookup(voice_name)
        tok = backend.tokenizer
        spoken = tok.spoken_char_ids(normalized) if tok.interleaved else None
        if spoken == []:
            raise ApiError(400, "'input' has no letter this model speaks "
                           f"({tok.layout.spoken_alphabet!r}): spell symbols out in words", "input")
        # The first characters follow the prompt; the engine feeds the rest.
        prompt, feeds = generation_start(tok, tts_prompt(tok, normalized, voice.text, voice.codes), spoken)
        rate = backend.codec.frame_rate
        max_frames = frame_limit(len(tok.encode_text(normalized)), settings.base_seconds * rate,
                                 settings.seconds_per_text_token * rate)
        room = backend.context_length - len(prompt) - len(feeds)
        if room < min(max_frames, rate):  # less than a second of speech would fit in the model's context
            raise ApiError(400, f"'input' is too long for this model: its prompt takes {len(prompt)} of "
                           f"{backend.context_length} positions; send a shorter text", "input")
        return {"prompt": prompt, "feeds": feeds, "max_frames": min(max_frames, room), "format": fmt,
                "sse": stream_format == "sse", "speed": float(speed),
                "voice": decoding_voice_vector}

    app.include_router(v1)
    return app


def _sse_delta(payload: bytes) -> bytes:
    event = {"type": "speech.audio.delta", "audio": base64.b64encode(payload).decode()}
    return f"data: {json.dumps(event)}\n\n".encode()


def _sse_done(event: Done | Failed) -> bytes:
    if isinstance(event, Failed):
        done = {"type": "error", "error": {"message": event.message, "code": event.status}}
    else:
        done = {"type": "speech.audio.done", "audio_seconds": round(event.audio_seconds, 3),
                "frames": event.frames, "truncated": event.truncated}
    return f"data: {json.dumps(done)}\n\n".encode()


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON ({error}): send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


async def _form(request: Request, max_bytes: int) -> Any:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the voice as multipart/form-data with fields file, text and name")
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise ApiError(413, f"the upload is larger than {max_bytes} bytes: send a shorter recording")
    try:
        return await request.form()
    except Exception as error:
        raise ApiError(400, f"could not parse the multipart form ({error})") from None

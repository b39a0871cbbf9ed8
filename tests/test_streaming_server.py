"""The streaming server end to end, over real HTTP on the tiny artifact (MAX backend) and tiny checkpoints
(torch backend): the engine's continuous batching against offline generation, the OpenAI client (streaming
included), every response format and SSE, voices (list, clone from an upload, use), the speed change,
validation (every malformed request gets a 4xx that says what to fix), 429 under a full queue, API keys,
deadlines, client disconnects freeing their KV slots, and the Prometheus metrics."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import threading
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import GREEDY, SENTENCE_A, RunningServer, export, load_script, start_server

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.export.kernels import silence_trim_reference
from voxlm.serve.app import VoiceBook
from voxlm.serve.backends import max_backend
from voxlm.serve.engine import Audio, Done, Engine, EngineConfig, Row, SpeechRequest
from voxlm.serve.formats import SpeedChanger, available_formats, wav_header
from voxlm.speechlm.generate import SamplingConfig, generate_codes
from voxlm.speechlm.sequences import tts_prompt
from voxlm.speechlm.voices import Voice, load_reference_audio

TEXT = "The little boat drifted across the lake."


def speak(url: str, timeout: float = 120, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": TEXT, **body},
                      timeout=timeout)


def a_voice(server: RunningServer) -> str:
    return httpx.get(f"{server.url}/v1/voices").json()["data"][0]["id"]


def wait_until_idle(server: RunningServer, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while server.server.engine.pool_used or server.server.engine.waiting:
        assert time.monotonic() < deadline, f"KV pool still holds {server.server.engine.pool_used} streams"
        time.sleep(0.05)


# ---- the engine, without HTTP ----

def run_engine(engine: Engine, prompts: list[np.ndarray], max_frames: int, steps_apart: int = 0,
               voices: list[torch.Tensor] | None = None) -> list[list[object]]:
    """Submit prompt i (decoded in voices[i], for a codec with a voice encoder) once the engine has taken
    i * steps_apart decode steps (0: all at once); every request's events once all are done."""
    events: list[list[object]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event: object) -> None:
            events[i].append(event)
            if not isinstance(event, Audio):
                done.release()
        return sink

    for i, prompt in enumerate(prompts):
        deadline = time.monotonic() + 60
        while engine.steps < i * steps_apart:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        engine.submit(SpeechRequest(prompt, max_frames, sink_for(i), time.monotonic() + 120, id=str(i),
                                    voice=None if voices is None else voices[i]))
    for _ in prompts:
        assert done.acquire(timeout=120)
    return events


def joined(events: list[object]) -> np.ndarray:
    return np.concatenate([e.samples for e in events if isinstance(e, Audio)] or [np.zeros(0, np.float32)])


def test_continuous_batching_streams_what_offline_generation_makes(artifact_dir: Path,
                                                                   tiny_voices: Path) -> None:
    """Greedy: each request, batched with others that join at different times, streams the audio that
    offline generation + decode makes for it alone (trim off; chunks only move boundaries). Requests come
    a few steps apart, longest prompt first, so rows move within MAX's cache both ways: joiners into spare
    rows, last rows into the gaps leavers make."""
    backend = max_backend(artifact_dir, extra_voices_dir=tiny_voices)
    moved = {"keep_rows": 0, "append_rows": 0}  # row moves done in place (None: the engine copied)

    def counted(name: str):
        move = getattr(backend, name)

        def call(*args):
            out = move(*args)
            moved[name] += out is not None
            return out
        return call

    backend.keep_rows, backend.append_rows = counted("keep_rows"), counted("append_rows")
    sampling = SamplingConfig(do_sample=False, repetition_window=8)
    engine = Engine(backend, EngineConfig(trim_leading_silence=False, chunk_frames=(3, 5, 8), min_seconds=0),
                    sampling)
    engine.start()
    try:
        voices = [Voice.load(p) for p in sorted(tiny_voices.iterdir())][:2]
        texts = ["Hello there.", "The quick brown fox jumps over the lazy dog.", "One, two, three, four."]
        prompts = sorted((tts_prompt(backend.tokenizer, t, v.text, v.codes) for t in texts for v in voices),
                         key=len, reverse=True)
        events = run_engine(engine, prompts, max_frames=40, steps_apart=5)
        for prompt, got in zip(prompts, events, strict=True):
            reference = generate_codes(backend.model, backend.tokenizer, [prompt], 40, sampling)
            codes = reference.codes[0]
            expected = backend.decoder.decode(codes[None])[0].numpy() if len(codes) else np.zeros(0)
            assert isinstance(got[-1], Done) and got[-1].frames == len(codes)
            assert got[-1].truncated == reference.truncated[0]
            np.testing.assert_allclose(joined(got), expected, atol=1e-4)
        assert engine.pool_used == 0 and engine.steps > 0
        assert moved["keep_rows"] and moved["append_rows"], moved
    finally:
        engine.stop()


def test_no_empty_answers(artifact_dir: Path, tiny_voices: Path) -> None:
    """[speech_end] is held back until min_seconds of audio: a text never gets an empty stream."""
    backend = max_backend(artifact_dir, extra_voices_dir=tiny_voices)
    end_bias: list[float] = []  # what the graph added to [speech_end]'s logit, step by step
    sample_step = backend.model.sample_step

    def watched(ids, mask, positions, cache, logit_bias, *args):
        end_bias.append(float(logit_bias[0, backend.tokenizer.speech_end_id]))
        return sample_step(ids, mask, positions, cache, logit_bias, *args)

    backend.model.sample_step = watched
    engine = Engine(backend, EngineConfig(trim_leading_silence=False, min_seconds=0.3),
                    SamplingConfig(do_sample=False, repetition_window=8))
    engine.start()
    try:
        done = run_engine(engine, [tts_prompt(backend.tokenizer, "Hi.")], max_frames=60)[0][-1]
    finally:
        engine.stop()
    min_frames = round(0.3 * backend.codec.frame_rate)
    assert done.frames >= min_frames
    assert all(v == -np.inf for v in end_bias[:min_frames])
    assert all(v == 0 for v in end_bias[min_frames:])


def test_trimming_drops_only_leading_silence(artifact_dir: Path, tiny_voices: Path) -> None:
    backend = max_backend(artifact_dir, extra_voices_dir=tiny_voices)
    sampling = SamplingConfig(do_sample=False, repetition_window=8)
    voice = Voice.load(sorted(tiny_voices.iterdir())[0])
    prompt = tts_prompt(backend.tokenizer, "Hello there.", voice.text, voice.codes)
    streams = {}
    for trim in (False, True):
        engine = Engine(backend, EngineConfig(trim_leading_silence=trim, silence_threshold_db=-30,
                                              min_seconds=0), sampling)
        engine.start()
        try:
            streams[trim] = joined(run_engine(engine, [prompt], max_frames=60)[0])
        finally:
            engine.stop()
    full, trimmed = streams[False], streams[True]
    dropped = len(full) - len(trimmed)
    assert dropped >= 0 and np.allclose(trimmed, full[dropped:], atol=1e-5)
    if dropped:  # what went was quiet
        assert 20 * np.log10(np.sqrt(np.mean(full[:dropped] ** 2)) + 1e-10) < -30


def test_leading_silence_is_trimmed_within_its_budget(artifact_dir: Path, tiny_voices: Path,
                                                      speech: dict[str, tuple[np.ndarray, int]]) -> None:
    """Real speech after 0.3 s of digital silence: the silence goes (up to the kernel's hangover), an
    all-silent chunk is held back, and no more than max_leading_silence_seconds is ever dropped."""
    backend = max_backend(artifact_dir, extra_voices_dir=tiny_voices)
    config = EngineConfig(silence_threshold_db=-40, max_leading_silence_seconds=0.5)
    engine = Engine(backend, config, SamplingConfig(do_sample=False, repetition_window=8))
    with pytest.raises(ValueError, match="does not run classifier-free guidance"):
        Engine(backend, config, SamplingConfig(do_sample=False, repetition_window=8, cfg_scale=2.0))
    with pytest.raises(ValueError, match="draw <\\|advance\\|> at the model's own odds"):
        Engine(backend, config, SamplingConfig(do_sample=False, repetition_window=8, advance_rate=0.7))
    rate, frame = backend.codec.sample_rate, engine.frame_length
    recording = speech["slt_a"][0]
    onset = silence_trim_reference(recording, frame, config.silence_threshold_db, 0).start
    voiced = recording[onset: onset + rate]  # starts with a voiced frame
    silence = np.zeros(round(0.3 * rate), np.float32)

    def new_row() -> Row:
        return Row(SpeechRequest(np.zeros(1, np.int64), 1, lambda _: None, 0.0), None)

    row = new_row()
    kept = engine._trim_leading(row, np.concatenate([silence, voiced]), final=False)
    dropped = len(silence) + len(voiced) - len(kept)
    assert len(silence) - (config.silence_hangover_frames + 1) * frame <= dropped <= len(silence)
    row = new_row()
    assert engine._trim_leading(row, silence, final=False) is None  # nothing audible yet: wait
    kept = engine._trim_leading(row, np.concatenate([silence, voiced]), final=False)
    assert row.trimmed_samples == round(0.5 * rate)  # the budget, not the 0.6 s of silence
    assert len(kept) == len(silence) + len(voiced) - (round(0.5 * rate) - len(silence))


# ---- HTTP: the OpenAI client, formats, SSE ----

def test_the_openai_client_streams_speech(max_server: RunningServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{max_server.url}/v1", api_key="unused")
    assert "tts-1" in [m.id for m in client.models.list()]
    voice = a_voice(max_server)
    pieces = []
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice=voice, input=TEXT,
                                                            response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        for chunk in response.iter_bytes():
            pieces.append(chunk)
    audio, rate = sf.read(io.BytesIO(b"".join(pieces)), dtype="float32")
    assert rate == max_server.server.backend.codec.sample_rate and len(audio) > 0
    # Not streamed through the client's helper: the whole body at once, the same (greedy) audio.
    whole = client.audio.speech.create(model="tts-1", voice=voice, input=TEXT, response_format="wav")
    assert whole.content == b"".join(pieces)


def test_every_response_format(max_server: RunningServer) -> None:
    voice = a_voice(max_server)
    rate = max_server.server.backend.codec.sample_rate
    pcm = speak(max_server.url, voice=voice, response_format="pcm")
    assert pcm.status_code == 200 and len(pcm.content) % 2 == 0
    reference = np.frombuffer(pcm.content, "<i2").astype(np.float32) / 32767
    wav = speak(max_server.url, voice=voice, response_format="wav").content
    with wave.open(io.BytesIO(wav[:44])) as header:  # the streamed header: 16-bit mono at our rate
        assert (header.getnchannels(), header.getsampwidth(), header.getframerate()) == (1, 2, rate)
    assert wav[44:] == pcm.content
    assert set(available_formats()) >= {"wav", "pcm", "flac"}
    for fmt in set(available_formats()) - {"wav", "pcm"}:
        response = speak(max_server.url, voice=voice, response_format=fmt)
        assert response.status_code == 200, fmt
        audio, got_rate = sf.read(io.BytesIO(response.content), dtype="float32")
        assert got_rate == rate and abs(len(audio) - len(reference)) < 0.1 * rate, fmt
        if fmt == "flac":  # lossless: the same 16-bit samples
            np.testing.assert_allclose(audio, reference, atol=1e-4)


def test_sse_carries_the_same_audio(max_server: RunningServer) -> None:
    voice = a_voice(max_server)
    pcm = speak(max_server.url, voice=voice, response_format="pcm").content
    response = speak(max_server.url, voice=voice, response_format="pcm", stream_format="sse")
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["frames"] > 0
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == pcm


def test_speed_changes_duration(max_server: RunningServer) -> None:
    voice = a_voice(max_server)
    lengths = {speed: len(speak(max_server.url, voice=voice, response_format="pcm", speed=speed).content)
               for speed in (1.0, 2.0, 0.5)}
    frame = 2 * round(0.03 * max_server.server.backend.codec.sample_rate)  # WSOLA's frame, in bytes
    assert lengths[1.0] > 4 * frame
    assert lengths[2.0] == pytest.approx(lengths[1.0] / 2, rel=0.1, abs=frame)
    assert lengths[0.5] == pytest.approx(lengths[1.0] * 2, rel=0.1, abs=frame)


def test_speed_changer_keeps_the_pitch() -> None:
    rate = 16000
    tone = (0.5 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)
    for speed in (0.5, 1.5, 3.0):
        changer = SpeedChanger(speed, rate)
        out = np.concatenate([changer.push(tone[i: i + 700]) for i in range(0, rate, 700)]
                             + [changer.push(np.zeros(0, np.float32), final=True)])
        assert len(out) == pytest.approx(rate / speed, rel=0.05)
        middle = out[len(out) // 4: 3 * len(out) // 4]
        peak = np.argmax(np.abs(np.fft.rfft(middle))) * rate / len(middle)
        assert peak == pytest.approx(220, abs=5)


def test_wav_header_declares_an_open_length() -> None:
    header = wav_header(24000)
    assert len(header) == 44 and header[:4] == b"RIFF" and header[40:44] == b"\xff\xff\xff\xff"


def test_the_load_benchmark_counts_playback_stalls() -> None:
    """scripts/bench_serve.py's listener: plays from the first byte in real time; a late chunk is a stall of
    exactly the time the audio had run out, and audio ahead of the clock is none."""
    bench = load_script("bench_serve")
    second = 2 * 1000  # bytes of one second of pcm s16 at 1000 Hz
    clock = bench.PlaybackClock(1000)
    for arrival in (0.1, 0.3, 0.5, 0.7):  # 0.2 s of audio every 0.2 s: just in time
        clock.arrived(arrival, second // 5)
    assert clock.stall_s == pytest.approx(0.0)
    clock.arrived(1.2, second // 5)  # the audio ran out at 0.9 s: 0.3 s of silence
    clock.arrived(1.3, second)       # ahead of the clock again
    clock.arrived(1.4, second // 5)
    assert clock.stall_s == pytest.approx(0.3)


# ---- voices ----

def test_clone_a_voice_from_an_upload_and_speak_with_it(max_server: RunningServer,
                                                        speech: dict[str, tuple[np.ndarray, int]]) -> None:
    audio, rate = speech["slt_a"]
    upload = io.BytesIO()
    sf.write(upload, audio, rate, format="WAV")
    files = {"file": ("slt.wav", upload.getvalue(), "audio/wav")}
    created = httpx.post(f"{max_server.url}/v1/voices", data={"name": "slt-upload", "text": SENTENCE_A},
                         files=files, timeout=60)
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "slt-upload" and created.json()["duration_seconds"] > 1
    assert "slt-upload" in [v["id"] for v in httpx.get(f"{max_server.url}/v1/voices").json()["data"]]
    assert speak(max_server.url, voice="slt-upload", response_format="pcm").status_code == 200
    again = httpx.post(f"{max_server.url}/v1/voices", data={"name": "slt-upload", "text": SENTENCE_A},
                       files=files, timeout=60)
    assert again.status_code == 409
    garbage = {"file": ("x.wav", b"not audio at all", "audio/wav")}
    cases = [({"name": "x", "text": SENTENCE_A}, garbage, "read"),
             ({"name": "y"}, files, "text"),
             ({"name": "../evil", "text": SENTENCE_A}, files, "name"),
             ({"name": "z", "text": SENTENCE_A}, None, "file")]
    for data, upload_files, mentioned in cases:
        response = httpx.post(f"{max_server.url}/v1/voices", data=data, files=upload_files, timeout=60)
        assert response.status_code == 400, (data, response.text)
        assert mentioned in response.json()["error"]["message"]


# ---- bad input, limits, faults ----

def test_malformed_requests_get_4xx_that_say_what_to_fix(max_server: RunningServer) -> None:
    voice = a_voice(max_server)
    url = f"{max_server.url}/v1/audio/speech"
    good = {"input": TEXT, "voice": voice}
    cases = [
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (httpx.post(url, json=["a list"]), 400, "object"),
        (httpx.post(url, json={**good, "input": "   "}), 400, "input"),
        (httpx.post(url, json={**good, "input": 5}), 400, "input"),
        (httpx.post(url, json={**good, "input": "word " * 2000}), 400, "split"),
        (httpx.post(url, json={**good, "voice": "nobody"}), 400, voice),
        (httpx.post(url, json={"input": TEXT}), 400, "voice"),
        (httpx.post(url, json={**good, "response_format": "aiff"}), 400, "wav"),
        (httpx.post(url, json={**good, "speed": 9}), 400, "speed"),
        (httpx.post(url, json={**good, "speed": "fast"}), 400, "speed"),
        (httpx.post(url, json={**good, "stream_format": "video"}), 400, "stream_format"),
        (httpx.post(url, json={**good, "stream_format": "sse", "response_format": "flac"}), 400, "sse"),
        (httpx.post(url, json={**good, "model": "gpt-5"}), 404, "tts-1"),
    ]
    for response, status, mentioned in cases:
        assert response.status_code == status, response.text
        assert mentioned in response.json()["error"]["message"], response.text
    assert httpx.get(f"{max_server.url}/health").json()["status"] == "ok"
    wait_until_idle(max_server)


def test_a_full_queue_answers_429_with_retry_after(max_server: RunningServer) -> None:
    """4 slots and a queue of 4: of 16 simultaneous requests, some must wait, the rest get 429."""
    voice = a_voice(max_server)
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(speak(max_server.url, voice=voice, response_format="pcm",
                             input="The quick brown fox jumps over the lazy dog. " * 3))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    statuses = sorted(r.status_code for r in results)
    assert len(results) == 16 and set(statuses) == {200, 429}, statuses
    # The queue takes 4 before anything is refused; how many more get in depends on when slots free up.
    assert statuses.count(200) >= 4
    refused = next(r for r in results if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and "retry" in refused.json()["error"]["message"]
    assert all(len(r.content) > 0 for r in results if r.status_code == 200)
    wait_until_idle(max_server)


def test_a_client_that_disconnects_frees_its_slot(max_server: RunningServer) -> None:
    voice = a_voice(max_server)
    metrics = max_server.server.metrics
    before = metrics.disconnects._value.get()
    long_text = "The quick brown fox jumps over the lazy dog. " * 6
    for _ in range(3):
        with httpx.stream("POST", f"{max_server.url}/v1/audio/speech", timeout=60,
                          json={"input": long_text, "voice": voice, "response_format": "pcm"}) as response:
            assert response.status_code == 200
            next(response.iter_raw())  # the first chunk, then hang up
    wait_until_idle(max_server)
    assert metrics.disconnects._value.get() >= before + 3


def test_metrics_report_latency_and_the_pool(max_server: RunningServer) -> None:
    speak(max_server.url, voice=a_voice(max_server), response_format="pcm")
    text = httpx.get(f"{max_server.url}/metrics").text
    for name in ("voxlm_time_to_first_audio_seconds_count", "voxlm_real_time_factor_bucket",
                 "voxlm_queue_depth", "voxlm_active_streams", "voxlm_decode_batch_size_count",
                 "voxlm_kv_pool_capacity 4.0",
                 'voxlm_responses_total{route="/v1/audio/speech",status="200"}'):
        assert name in text, name
    count = next(line for line in text.splitlines()
                 if line.startswith("voxlm_time_to_first_audio_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_api_key_and_deadline(artifact_dir: Path, tiny_voices: Path) -> None:
    server = start_server(f"artifact={artifact_dir}", f"api.voices_dir={tiny_voices}", "api.api_key=s3cret",
                          "api.request_timeout_seconds=0.001", *GREEDY)
    try:
        voice = httpx.get(f"{server.url}/v1/voices", headers={"Authorization": "Bearer s3cret"}).json()
        body = {"input": TEXT, "voice": voice["data"][0]["id"]}
        missing = httpx.post(f"{server.url}/v1/audio/speech", json=body)
        wrong = httpx.post(f"{server.url}/v1/audio/speech", json=body, headers={"Authorization": "Bearer no"})
        assert missing.status_code == wrong.status_code == 401
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").status_code == 200  # health stays open for load balancers
        late = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60,
                          headers={"Authorization": "Bearer s3cret"})
        assert late.status_code == 504 and "deadline" in late.json()["error"]["message"]
        wait_until_idle(server)
    finally:
        server.stop()


def test_torch_backend_serves_the_same_speech(max_server: RunningServer, sft_runs: dict[str, Path],
                                              workspace: Path, tiny_voices: Path) -> None:
    """The PyTorch reference behind the same API: greedy audio matches the MAX backend's."""
    server = start_server("backend=torch", f"checkpoint={sft_runs['full']}",
                          f"codec={workspace / 'runs/codec/tiny'}", f"api.voices_dir={tiny_voices}", *GREEDY)
    try:
        assert httpx.get(f"{server.url}/health").json()["backend"] == "torch"
        voice = a_voice(server)
        ours = np.frombuffer(speak(server.url, voice=voice, response_format="pcm").content, "<i2")
        theirs = np.frombuffer(speak(max_server.url, voice=voice, response_format="pcm").content, "<i2")
        assert len(ours) == len(theirs) > 0
        assert np.abs(ours.astype(np.int32) - theirs).max() <= 2  # 16-bit rounding of float32 differences
    finally:
        server.stop()


def test_a_stream_cut_by_its_deadline_does_not_end_cleanly(artifact_dir: Path, tiny_voices: Path) -> None:
    """After the 200 went out, a deadline can only be told by the body: the connection drops without the
    final chunk, so clients see an incomplete response rather than a short, clean one."""
    server = start_server(f"artifact={artifact_dir}", f"api.voices_dir={tiny_voices}",
                          "api.request_timeout_seconds=0.25", "sampling.do_sample=false",
                          # No [speech_end] before 20 s of audio: the stream runs until the tiny model's
                          # context is full (~1,600 codes, 1.1 s of work on the dev box), and the 0.25 s
                          # deadline cuts it; its first audio comes in ~0.03 s.
                          "engine.min_seconds=20")
    try:
        # The shortest voice prompt leaves the most room in the context (the text's length guard is longer).
        voices = httpx.get(f"{server.url}/v1/voices").json()["data"]
        voice = min(voices, key=lambda v: v["duration_seconds"])["id"]
        body = {"input": "The quick brown fox jumps over the lazy dog. " * 6, "voice": voice,
                "response_format": "pcm"}
        received = 0
        with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012 (the error comes mid-stream)
            with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
                assert response.status_code == 200
                for chunk in response.iter_raw():
                    received += len(chunk)
        assert received > 0
        wait_until_idle(server)
    finally:
        server.stop()


def test_a_voice_codec_is_exported_and_served_in_each_voice(workspace: Path, tiny_corpus: Path,
                                                            sft_runs: dict[str, Path], tiny_voices: Path,
                                                            tmp_path: Path) -> None:
    """A codec with a voice encoder (the tiny codec plus an untrained voice encoder, voice_dim 8) passes the
    parity gate with its voice graph checked; the engine decodes each stream in its request's voice, as
    offline decoding does; the server computes a voice's vector from its reference.wav (a voice saved
    without one is not served), and the MAX and PyTorch servers speak alike."""
    torch.manual_seed(0)
    plain = load_codec(workspace / "runs/codec/tiny")
    voiced = Codec(**{**plain.config, "voice_dim": 8})
    voiced.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():  # an untrained projection starts near zero: scale it so that the voice is heard
        voiced.decoder.voice_proj.weight.normal_(0, 0.5)
    voiced.eval()
    codec_run = tmp_path / "codec-voice"
    codec_run.mkdir()
    torch.save({"config": voiced.config, "state_dict": voiced.state_dict()}, codec_run / "codec.pt")
    out = tmp_path / "artifact"
    result = export(workspace, tiny_corpus, f"speechlm={sft_runs['full']}", f"codec={codec_run}",
                    f"out={out}", f"voices_dir={tiny_voices}")
    assert result.returncode == 0, result.stderr[-3000:]
    checks = {c["metric"]: c for c in json.loads((out / "parity.json").read_text())["checks"]}
    assert checks["voice_snr_db_min"]["passed"] and checks["voice_snr_db_min"]["value"] >= 50

    names = sorted(p.name for p in tiny_voices.iterdir())[:2]
    references = [load_reference_audio(name, tiny_voices, voiced.sample_rate) for name in names]
    with torch.no_grad():
        vectors = [voiced.voice(torch.from_numpy(audio)[None]) for audio in references]
    backend = max_backend(out)
    book = VoiceBook(backend.voices_dirs, tmp_path / "served-voices", backend)
    for name, vector in zip(names, vectors, strict=True):
        served = book.lookup(name)[1]
        assert served is not None and torch.allclose(served, vector, atol=1e-4), name

    sampling = SamplingConfig(do_sample=False, repetition_window=8)
    engine = Engine(backend, EngineConfig(trim_leading_silence=False, chunk_frames=(3, 5, 8), min_seconds=0),
                    sampling)
    engine.start()
    try:
        voices = [Voice.load(tiny_voices / name) for name in names]
        prompts = [tts_prompt(backend.tokenizer, "Hello there.", v.text, v.codes) for v in voices]
        events = run_engine(engine, prompts, max_frames=40, voices=vectors)
        for prompt, vector, got in zip(prompts, vectors, events, strict=True):
            codes = generate_codes(backend.model, backend.tokenizer, [prompt], 40, sampling).codes[0]
            assert len(codes) > 0 and isinstance(got[-1], Done)
            with torch.no_grad():
                expected = voiced.decode(torch.as_tensor(codes)[None], vector)[0].numpy()
                elsewhere = voiced.decode(torch.as_tensor(codes)[None], -vector)[0].numpy()
            np.testing.assert_allclose(joined(got), expected, atol=1e-4)
            assert np.abs(expected - elsewhere).max() > 1e-2  # another voice would sound otherwise
    finally:
        engine.stop()

    bare = tmp_path / "bare-voices" / "no-reference"  # a voice kept without its recording
    bare.mkdir(parents=True)
    for file in ("voice.json", "codes.npy"):
        (bare / file).write_bytes((tiny_voices / names[0] / file).read_bytes())
    assert "no-reference" not in VoiceBook([bare.parent], tmp_path / "served-voices", backend).names()
    # A voice another codec encoded is served in this codec's codes, from its recording, by the MAX encoder.
    foreign = tmp_path / "foreign-voices"
    shutil.copytree(tiny_voices / names[0], foreign / "elsewhere")
    saved = Voice.load(foreign / "elsewhere")
    dataclasses.replace(saved, codes=(saved.codes + 1) % saved.codebook_size, codec_id="0" * 16).save(
        foreign / "elsewhere")
    served = VoiceBook([foreign], tmp_path / "served-voices", backend).get("elsewhere")
    with torch.no_grad():
        expected = voiced.encode(torch.from_numpy(references[0])[None])[0].numpy()
    np.testing.assert_array_equal(served.codes, expected)
    assert served.codec_id == voiced.code_fingerprint()

    max_server = start_server(f"artifact={out}", f"api.voices_dir={tiny_voices}", *GREEDY)
    torch_server = start_server("backend=torch", f"checkpoint={sft_runs['full']}", f"codec={codec_run}",
                                f"api.voices_dir={tiny_voices}", *GREEDY)
    try:
        ours, theirs = (np.frombuffer(speak(server.url, voice=names[0], response_format="pcm").content, "<i2")
                        for server in (max_server, torch_server))
        assert len(ours) == len(theirs) > 0
        assert np.abs(ours.astype(np.int32) - theirs).max() <= 2  # 16-bit rounding of float32 differences
    finally:
        max_server.stop()
        torch_server.stop()

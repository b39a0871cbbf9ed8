"""The serving engine: continuous batching of SpeechLM decode steps across requests, scheduled so that a new
request's first audio leaves early, with each request's codes decoded to audio chunk by chunk as they come.

    submit() ─► waiting ─► admit: prefill the newcomers together, sample their first code ─► warming group
    warming group: stepped first, alone (a small batch: fast steps) until each row's first chunk is out
    ─► running group: everyone else, stepped when no newcomer waits, at least once every `max_running_skips`
       newcomer steps, and (when `min_slack_seconds` > 0) when a row's audio is about to run out (less than
       that decoded ahead of real-time playback, but not yet behind it: a stream already behind, as on an
       overloaded machine, waits for the newcomers' first chunks like the rest)
    each step: one forward over the group's KV cache ─► sample ─► codes into each row's chunk ─► a full chunk
    (schedule `chunk_frames`: small first, then larger) is decoded with left context (codec stream state) ─►
    leading silence trimmed, boundary moved to the quietest frame near the chunk's end ─► the request's sink

A group is a batch of rows sharing one KV cache, left-padded to a common past length with an attention mask
(the layout `voxlm.speechlm.generate.stream_codes` uses, so a lone request samples what it would there).
Rows join and leave between steps, never per step: when a request arrives, finishes, is cancelled or passes
its deadline. On MAX's CPU cache a leaving row's place is taken by the batch's last row and a joining row
is written into a spare row, so each copies one row; otherwise (PyTorch, a joining row with the longer
past, too much shared padding) the group's cache is copied whole.

The KV pool is the set of slots (`max_active_streams`): a request holds one from admission until its stream
ends for any reason; `pool_used` is what the soak test checks returns to zero. Requests beyond the pool wait
in a queue of at most `max_queue` (the HTTP layer answers 429 beyond it). All model work runs on the engine's
own thread; sinks are called from it and must only hand the event over (e.g. to an asyncio loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache

from voxlm.serve.backends import Backend
from voxlm.speechlm.generate import SamplingConfig, left_pad

log = logging.getLogger("voxlm.serve")


@dataclass(frozen=True)
class EngineConfig:
    max_active_streams: int = 16         # KV pool slots: requests decoding at once
    max_queue: int = 64                  # requests waiting for a slot; beyond: QueueFull (HTTP 429)
    max_prefill_batch: int = 8           # newcomers prefilled together in one forward
    chunk_frames: tuple[int, ...] = (5, 10, 20, 40)  # codes per audio chunk, the last size repeats
    min_slack_seconds: float = 0.0       # step the running group when a row has less audio than this ahead
    max_running_skips: int = 16          # ... and at least every this many warming steps
    min_seconds: float = 0.2             # [speech_end] is not sampled before this much audio (never empty)
    trim_leading_silence: bool = True
    silence_threshold_db: float = -40.0
    silence_frame_seconds: float = 0.01
    silence_hangover_frames: int = 2
    max_leading_silence_seconds: float = 1.0  # never hold back more than this waiting for speech to start
    boundary_search_seconds: float = 0.04     # move a chunk's end to the quietest frame within this much
    idle_wait_seconds: float = 0.05
    max_shared_padding: float = 0.25     # share of columns padding in every row before a cache is copied

    def __post_init__(self) -> None:
        if not self.chunk_frames or min(self.chunk_frames) < 1:
            raise ValueError(f"chunk_frames must be positive sizes, got {list(self.chunk_frames)}")
        if min(self.max_active_streams, self.max_prefill_batch) < 1 or self.max_queue < 0:
            raise ValueError("max_active_streams and max_prefill_batch must be >= 1, max_queue >= 0")
        if not 0 <= self.max_shared_padding <= 1:
            raise ValueError(f"max_shared_padding is a share of the columns (0 to 1), "
                             f"got {self.max_shared_padding}")


class QueueFull(Exception):
    """The waiting queue is full: try again later."""


# --- what a request receives ------------------------------------------------------------------------------

@dataclass
class Audio:
    samples: np.ndarray  # float32 [n], the next piece of the stream


@dataclass
class Done:
    frames: int          # codes generated
    truncated: bool      # the length guard cut it off before [speech_end]
    audio_seconds: float


@dataclass
class Failed:
    message: str
    status: int          # the HTTP status it maps to (504: deadline, 500: engine error)


Event = Audio | Done | Failed


@dataclass
class SpeechRequest:
    prompt: np.ndarray                    # token ids (tts_prompt)
    max_frames: int                       # the length guard
    sink: Callable[[Event], None]
    deadline: float                       # time.monotonic() after which the stream is ended
    id: str = ""
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False               # set by the client side; the engine frees the slot at its next turn
    playback_rate: float = 1.0            # audio seconds the client plays per second (its speed change)
    # Interleaved SpeechLMs: the token fed at each <|advance|> the model says (`tok.spoken_feeds`; the first
    # characters are already at the end of `prompt`). [speech_end] waits until all are fed.
    feeds: list[int] = field(default_factory=list)
    voice: Tensor | None = None           # [1, voice_dim]: what a codec with a voice encoder decodes it in

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Row:
    """A request's state inside the engine."""

    request: SpeechRequest
    stream_state: Any                     # the codec decoder's left context
    frames: int = 0
    chunk_index: int = 0
    pending: list[int] = field(default_factory=list)   # codes not yet decoded
    first_audio: float | None = None      # monotonic time of the first audio handed to the sink
    audio_samples: int = 0                # handed to the sink so far
    leading: bool = True                  # nothing audible emitted yet: leading silence is still trimmed
    trimmed_samples: int = 0
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # audio after the last cut
    finished: bool = False
    fed: int = 0                          # request.feeds handed to the model so far

    @property
    def may_advance(self) -> bool:
        return self.fed < len(self.request.feeds)


@dataclass
class Group:
    """Rows that decode together over one KV cache (left-padded to a common past length P)."""

    rows: list[Row]
    cache: Any
    mask: Tensor        # [B, P] 1 = a real token
    positions: Tensor   # [B] the next token's position
    last_token: Tensor  # [B] the token sampled last (fed at the next step)
    recent: Tensor      # [B, W] the last W code tokens, for the repetition penalty (-1: none)

    def __len__(self) -> int:
        return len(self.rows)


class Engine:
    """One thread runs the model; `submit` / `cancel` / `stats` may be called from any thread."""

    def __init__(self, backend: Backend, config: EngineConfig, sampling: SamplingConfig,
                 metrics: Any | None = None) -> None:
        if sampling.repetition_window is None:
            raise ValueError("serving needs a finite sampling.repetition_window (codes back)")
        if sampling.cfg_scale != 1.0:
            raise ValueError(f"sampling.cfg_scale={sampling.cfg_scale}: the server does not run "
                             "classifier-free guidance (its batches hold no textless rows); serve with "
                             "cfg_scale 1.0, or use synth.py for guided speech")
        if sampling.advance_rate != 1.0:
            raise ValueError(f"sampling.advance_rate={sampling.advance_rate}: the server's samplers (torch "
                             "and the Mojo kernel) draw <|advance|> at the model's own odds; serve with "
                             "advance_rate 1.0, or use synth.py for a slower pace")
        self.backend = backend
        self.config = config
        self.sampling = sampling
        self.metrics = metrics
        self.tok = backend.tokenizer
        self.sample_rate = backend.codec.sample_rate
        self.hop = backend.codec.hop_length
        self.frame_length = max(1, round(config.silence_frame_seconds * self.sample_rate))
        self.min_frames = round(config.min_seconds * backend.codec.frame_rate)
        self.generator = None
        if sampling.seed is not None and not sampling.greedy:
            self.generator = torch.Generator().manual_seed(sampling.seed)
        self.waiting: deque[SpeechRequest] = deque()
        self.active: dict[int, Row] = {}       # id(request) -> row: the KV pool's used slots
        self.warming: Group | None = None
        self.running: Group | None = None
        self.steps = 0
        self._running_skips = 0  # warming steps since the running group's last step
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- the client side ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def warmup(self) -> None:
        """Before `start`: run every kernel once (a prefill, decode steps, codec chunks, the silence detector)
        so that no request pays for a first call: MAX loads a graph's kernels and the Mojo kernel its library
        lazily."""
        if self._thread is not None:
            raise RuntimeError("warm the engine up before starting it")
        prompt = np.array([self.tok.bos_id, self.tok.text_start_id, self.tok.text_end_id,
                           self.tok.speech_start_id], dtype=np.int64)
        frames = max(self.config.chunk_frames) + 2
        # A codec with a voice encoder decodes in a voice: the voice of a short silence warms its graph too.
        voice = (self.backend.encoder.voice(torch.zeros(1, self.hop * 8)) if self.backend.codec.has_voice
                 else None)
        self.submit(SpeechRequest(prompt, frames, lambda _: None, time.monotonic() + 600, id="warmup",
                                  voice=voice))
        self.backend.trim(np.zeros(self.frame_length * 4, np.float32), self.frame_length, -40.0, 0)
        while self.waiting or self.active:
            self._turn()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="voxlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: SpeechRequest) -> None:
        with self._wake:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue)")
            self.waiting.append(request)
            self._wake.notify()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    @property
    def pool_used(self) -> int:
        return len(self.active)

    def stats(self) -> dict[str, int]:
        kv_tokens = sum(int(g.mask.numel()) for g in (self.warming, self.running) if g is not None)
        return {"queue_depth": len(self.waiting), "active_streams": len(self.active),
                "pool_capacity": self.config.max_active_streams, "kv_tokens": kv_tokens}

    # --- the engine thread ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    break
                if not self.waiting and not self.active:
                    self._wake.wait(self.config.idle_wait_seconds)
                    continue
            try:
                self._turn()
            except Exception as error:  # a failing step must not take the server down: fail its requests
                log.exception("engine step failed")
                self._fail_all(f"engine error: {error}")
            if self.metrics is not None:
                self.metrics.engine_state(**self.stats())
        self._fail_all("the server is shutting down", status=503)

    def _turn(self) -> None:
        """One round: free ended slots, admit newcomers, step the warming group, and the running one when
        its turn has come (see the module docstring)."""
        self._drop_ended()
        self._admit()
        if self.warming is not None:
            self._step("warming")
            self._graduate()
            self._running_skips += 1
        if self.running is not None and (self.warming is None or self._running_short_of_audio()
                                         or self._running_skips >= self.config.max_running_skips):
            self._step("running")
            self._running_skips = 0

    def _admit(self) -> None:
        """Prefill waiting requests, as many as there are free slots (up to max_prefill_batch), together."""
        newcomers: list[SpeechRequest] = []
        with self._wake:
            while self.waiting and len(newcomers) < min(self.config.max_prefill_batch,
                                                        self.config.max_active_streams - len(self.active)):
                request = self.waiting.popleft()
                if request.cancelled:
                    continue
                if time.monotonic() > request.deadline:
                    request.sink(Failed("the request waited past its deadline for a free slot", 504))
                    continue
                newcomers.append(request)
        if not newcomers:
            return
        rows = [Row(r, self.backend.decoder.init_stream(1, r.voice)) for r in newcomers]
        for row in rows:
            self.active[id(row.request)] = row
        ids, mask = left_pad([r.prompt for r in newcomers], self.tok.pad_id)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        recent = torch.full((len(rows), self.sampling.repetition_window), -1, dtype=torch.long)
        tokens, cache = self._forward(rows, ids, mask, positions, self._empty_cache(), recent)
        group = Group(rows, cache, mask, mask.sum(1), tokens, recent)
        if self.metrics is not None:
            self.metrics.prefill(len(rows))
        group = self._take(group, tokens)
        self.warming = self._merge(self.warming, group)

    def _empty_cache(self) -> DynamicCache:
        """What the sampler passes for "no past" (MaxSpeechLM takes it as such too)."""
        return DynamicCache(config=self.backend.model.config)

    def _step(self, which: str) -> None:
        group: Group = getattr(self, which)
        mask = torch.cat([group.mask, torch.ones(len(group), 1, dtype=torch.long)], dim=1)
        tokens, group.cache = self._forward(group.rows, group.last_token[:, None], mask,
                                            group.positions[:, None], group.cache, group.recent)
        group.mask, group.positions = mask, group.positions + 1
        self.steps += 1
        if self.metrics is not None:
            self.metrics.decode_step(len(group))
        setattr(self, which, self._take(group, tokens))

    def _forward(self, rows: list[Row], ids: Tensor, mask: Tensor, positions: Tensor, cache: Any,
                 recent: Tensor) -> tuple[Tensor, Any]:
        """The backend's forward and sampling: each row's next token, and the cache."""
        # [speech_end] waits for min_frames: a model that ends at once would answer a text with silence; in
        # the interleaved format it also waits for the last character, and <|advance|> comes only before it.
        advance_allowed = torch.tensor([row.may_advance for row in rows])
        end_allowed = torch.tensor([row.frames >= self.min_frames for row in rows]) & ~advance_allowed
        return self.backend.step(ids, mask, positions, cache, end_allowed, advance_allowed, recent,
                                 self.sampling, self.generator)

    def _take(self, group: Group, tokens: Tensor) -> Group | None:
        """Each row's next token: hand out full chunks, feed the next character where a row advances, and
        drop the rows that finished."""
        fed, said = tokens.clone(), tokens.clone()  # what the next step reads; codes for the penalty's window
        for i, (row, token) in enumerate(zip(group.rows, tokens.tolist(), strict=True)):
            if token == self.tok.advance_id and row.may_advance:
                fed[i], said[i] = row.request.feeds[row.fed], -1
                row.fed += 1
        group.last_token = fed
        if group.recent.shape[1]:
            group.recent = torch.cat([group.recent[:, 1:], said[:, None]], dim=1)
        for row, token in zip(group.rows, said.tolist(), strict=True):
            if token == -1:
                continue
            if token == self.tok.speech_end_id:
                self._finish(row, truncated=False)
                continue
            row.pending.append(token - self.tok.code_offset)
            row.frames += 1
            if row.frames >= row.request.max_frames:
                self._finish(row, truncated=True)
            elif len(row.pending) >= self._chunk_size(row):
                self._decode_chunk(row, final=False)
        return self._keep(group, [i for i, row in enumerate(group.rows) if not row.finished])

    def _chunk_size(self, row: Row) -> int:
        sizes = self.config.chunk_frames
        return sizes[min(row.chunk_index, len(sizes) - 1)]

    def _graduate(self) -> None:
        """Warming rows whose first audio is out join the running group."""
        group = self.warming
        if group is None:
            return
        ready = [i for i, row in enumerate(group.rows) if row.first_audio is not None]
        if not ready:
            return
        staying = sorted(set(range(len(group))) - set(ready))
        self.running = self._merge(self.running, group, ready)  # copies the ready rows out of group
        self.warming = self._keep(group, staying)

    def _running_short_of_audio(self) -> bool:
        now = time.monotonic()
        for row in self.running.rows:
            played = now - (row.first_audio if row.first_audio is not None else now)
            ahead = row.audio_samples / self.sample_rate / row.request.playback_rate - played
            if 0 <= ahead < self.config.min_slack_seconds:
                return True
        return False

    def _drop_ended(self) -> None:
        """Free the slots of cancelled requests and of those past their deadline."""
        now = time.monotonic()
        for which in ("warming", "running"):
            group: Group | None = getattr(self, which)
            if group is None:
                continue
            keep = []
            for i, row in enumerate(group.rows):
                if row.request.cancelled:
                    self._release(row)
                elif now > row.request.deadline:
                    self._release(row)
                    row.request.sink(Failed("the request ran past its deadline", 504))
                else:
                    keep.append(i)
            if len(keep) < len(group):
                setattr(self, which, self._keep(group, keep))

    def _fail_all(self, message: str, status: int = 500) -> None:
        for row in list(self.active.values()):
            self._release(row)
            row.request.sink(Failed(message, status))
        self.warming = self.running = None
        with self._wake:
            while self.waiting:
                self.waiting.popleft().sink(Failed(message, 503))

    def _release(self, row: Row) -> None:
        row.finished = True
        self.active.pop(id(row.request), None)

    # --- audio ----------------------------------------------------------------------------------------------

    def _finish(self, row: Row, truncated: bool) -> None:
        self._decode_chunk(row, final=True)
        self._release(row)
        seconds = row.audio_samples / self.sample_rate
        if self.metrics is not None:
            elapsed = time.monotonic() - row.request.created
            self.metrics.finished(elapsed / seconds if seconds else None, seconds, truncated)
        row.request.sink(Done(row.frames, truncated, seconds))

    def _decode_chunk(self, row: Row, final: bool) -> None:
        codes, row.pending = row.pending, []
        audio = np.zeros(0, np.float32)
        if codes:
            decoded, row.stream_state = self.backend.decoder.stream(
                torch.tensor([codes], dtype=torch.long), row.stream_state)
            audio = decoded[0].float().cpu().numpy()
        if row.leading and self.config.trim_leading_silence:
            audio = self._trim_leading(row, audio, final)
            if audio is None:  # all silence so far: look again after another first-size chunk
                return
        row.leading = False
        row.chunk_index += 1  # the schedule (small first chunk, then larger) starts at the first sound
        audio = np.concatenate([row.held, audio]) if len(row.held) else audio
        row.held = np.zeros(0, np.float32)
        if not final and row.first_audio is not None:
            audio, row.held = self._quiet_cut(audio)
        if len(audio):
            self._emit(row, audio)

    def _trim_leading(self, row: Row, audio: np.ndarray, final: bool) -> np.ndarray | None:
        """Drop silence before the first voiced frame; None: the chunk was all silence, wait for the next."""
        cfg = self.config
        if not len(audio):
            return None if not final else audio
        found = self.backend.trim(audio, self.frame_length, cfg.silence_threshold_db,
                                  cfg.silence_hangover_frames)
        budget = round(cfg.max_leading_silence_seconds * self.sample_rate) - row.trimmed_samples
        if found.empty and len(audio) <= budget and not final:
            row.trimmed_samples += len(audio)
            return None
        start = 0 if found.empty else min(found.start, max(budget, 0))
        row.trimmed_samples += start
        return audio[start:]

    def _quiet_cut(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(to send now, to hold for the next chunk): cut at the middle of the quietest frame among the last
        boundary_search_seconds, so that a pause between network chunks falls where the speech is quiet."""
        window = round(self.config.boundary_search_seconds * self.sample_rate)
        frames = window // self.frame_length
        if frames < 2 or len(audio) < 2 * window:
            return audio, np.zeros(0, np.float32)
        start = len(audio) - frames * self.frame_length
        tail = self.backend.trim(audio[start:], self.frame_length, self.config.silence_threshold_db, 0)
        rms_db = tail.rms_db
        quietest = len(rms_db) - 1 - int(np.argmin(rms_db[::-1]))  # the latest of equally quiet frames
        cut = start + quietest * self.frame_length + self.frame_length // 2
        return audio[:cut], audio[cut:].copy()

    def _emit(self, row: Row, audio: np.ndarray) -> None:
        if row.first_audio is None:
            row.first_audio = time.monotonic()
            if self.metrics is not None:
                self.metrics.first_audio(row.first_audio - row.request.created)
        row.audio_samples += len(audio)
        row.request.sink(Audio(np.ascontiguousarray(audio, dtype=np.float32)))

    # --- groups: the only places the KV cache is copied ----------------------------------------------------

    def _keep(self, group: Group, rows: list[int], copy: bool = False) -> Group | None:
        """The group restricted to `rows` (None when empty). Where the backend can, the rows stay in the
        group's cache and the last ones fill the gaps (one row's copy per leaver); else, or with `copy`
        (the group keeps its cache for other rows), a new cache, without the left padding no row needs."""
        if not rows:
            return None
        if len(rows) == len(group) and not copy:
            return group
        mask = group.mask[torch.tensor(rows, dtype=torch.long)]
        first = int(mask.any(0).long().argmax())  # columns before it are padding in every kept row
        if (not copy and self.backend.keep_rows is not None
                and first <= self.config.max_shared_padding * mask.shape[1]):
            order = _fill_gaps(rows)
            cache = self.backend.keep_rows(group.cache, order)
            if cache is not None:
                return _rows_of(group, order, cache)
        index = torch.tensor(rows, dtype=torch.long)
        tensors = [t[index][:, :, first:] for t in self.backend.cache_to_tensors(group.cache)]
        group = _rows_of(group, rows, self.backend.cache_from_tensors(tensors, spare_rows=self._spare(rows)))
        group.mask = group.mask[:, first:]
        return group

    def _merge(self, a: Group | None, b: Group | None, b_rows: list[int] | None = None) -> Group | None:
        """One group of a's rows and b's (`b_rows` of them, default all; b itself is left as it was), the
        shorter past left-padded to the longer. b's rows go into spare rows of a's cache where the backend
        has them, else both are copied into a new one."""
        if b is None:
            return a
        b_rows = list(range(len(b))) if b_rows is None else b_rows
        if a is None:
            return self._keep(b, b_rows, copy=len(b_rows) < len(b))
        width = max(a.mask.shape[1], b.mask.shape[1])
        index = torch.tensor(b_rows, dtype=torch.long)

        def pad(t: Tensor, dim: int) -> Tensor:
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        cache = None
        if self.backend.append_rows is not None and b.mask.shape[1] <= a.mask.shape[1]:
            cache = self.backend.append_rows(a.cache, b.cache, b_rows)
        if cache is None:
            tensors = [torch.cat([pad(x, 2), pad(y[index], 2)]) for x, y in zip(
                self.backend.cache_to_tensors(a.cache), self.backend.cache_to_tensors(b.cache), strict=True)]
            cache = self.backend.cache_from_tensors(tensors, spare_rows=self._spare(a.rows + b_rows))
        return Group(a.rows + [b.rows[i] for i in b_rows], cache,
                     torch.cat([pad(a.mask, 1), pad(b.mask[index], 1)]),
                     torch.cat([a.positions, b.positions[index]]),
                     torch.cat([a.last_token, b.last_token[index]]),
                     torch.cat([a.recent, b.recent[index]]))

    def _spare(self, rows: list) -> int:
        """Rows a new cache keeps free for requests joining later: room for the whole KV pool."""
        return max(0, self.config.max_active_streams - len(rows))


def _fill_gaps(rows: list[int]) -> list[int]:
    """An order of `rows` (some of a group's row indices) in which the rows below the new end stay where they
    are and the gaps below it are filled by the rows beyond it: each moved row is read before anything is
    written over it."""
    end = len(rows)
    movers = iter(r for r in rows if r >= end)
    kept = set(rows)
    return [j if j in kept else next(movers) for j in range(end)]


def _rows_of(group: Group, order: list[int], cache: Any) -> Group:
    """The group's rows in `order` over `cache` (which already holds them in that order)."""
    index = torch.tensor(order, dtype=torch.long)
    return Group([group.rows[i] for i in order], cache, group.mask[index], group.positions[index],
                 group.last_token[index], group.recent[index])

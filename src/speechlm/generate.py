"""Sampling speech codes from the SpeechLM, with its own decoding loop so that codes stream out as sampled.

    prompts (tts_prompt) ─► left-pad ─► prefill (KV cache) ─► per step: logits ─► code-only mask
    ─► repetition penalty ─► temperature ─► top-k ─► top-p ─► sample (or argmax) ─► feed back ─► ...

The loop runs a stock `transformers` causal LM step by step over a DynamicCache instead of calling
`model.generate`, because a server must hand each chunk of codes to the codec decoder while the rest is
still being sampled, and because the SpeechLM's rules are its own:
- only code tokens and [speech_end] are ever sampled: text, control and padded-vocabulary rows are masked;
- a row stops at [speech_end], independently of the other rows of its batch;
- a row that never says [speech_end] is cut off at its `max_frames` (see `frame_limit`: a budget that grows
  with the text's length) and flagged `truncated`, so a babbling model costs a bounded amount of compute;
- in the interleaved format (voxlm.speechlm.sequences) each row's spoken characters (`spoken`) are fed in
  order (`tok.spoken_feeds`): the first (with the lookahead's) after the prompt, the next each time the
  model says <|advance|>, which it may only say while a character's codes are still to come; [speech_end]
  only after the last one;
- with classifier-free guidance (`cfg_scale` > 1, `guide`) each row has a twin in the batch that reads the
  same codes without the text, and the codes are drawn from the two rows' distributions combined.
Only codes are yielded.

Greedy decoding (do_sample false or temperature 0; repetition_penalty 1) is the argmax path of a plain
full-recompute forward, which the tests check; sampling is reproducible from `seed` (a torch.Generator).
Rows that have stopped stay in the batch (fed padding) until the last row stops.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from voxlm.speechlm.sequences import generation_start, unconditional_prompt
from voxlm.speechlm.tokenizer import SpeechTokenizer

Prompt = Sequence[int] | np.ndarray | Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen; the defaults are plain sampling from the model's distribution."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None          # keep the k most likely tokens (None or 0: all)
    top_p: float = 1.0                # keep the smallest set of tokens holding this much probability
    repetition_penalty: float = 1.0   # CTRL-style, on codes among the last `repetition_window` generated
    repetition_window: int | None = None  # None: every code generated so far; 0: none
    seed: int | None = None           # None: torch's global generator
    cfg_scale: float = 1.0            # classifier-free guidance on the text (`guide`); 1: off
    # Interleaved models: the odds of <|advance|> against every other token are multiplied by this before
    # the temperature; below 1 the model dwells longer on each character (slower speech). 1: off.
    advance_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"bad sampling settings: {self}")
        if self.advance_rate <= 0:
            raise ValueError(f"advance_rate={self.advance_rate}: it scales the odds of moving on, so it must "
                             "be positive (1.0: off; below 1: slower speech)")
        if self.cfg_scale < 1:
            raise ValueError(f"cfg_scale={self.cfg_scale}: guidance scales start at 1.0 (off); a scale below "
                             "would steer toward speech that ignores the text")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass
class CodeChunk:
    """What one streaming step yields, for each row of the batch."""

    codes: list[Tensor]    # LongTensor [n_i] of codec codes sampled since the previous chunk (may be empty)
    finished: list[bool]   # the row has stopped: no further chunk carries codes for it
    truncated: list[bool]  # the row was cut off at its max_frames before it said [speech_end]
    tokens: list[Tensor]   # LongTensor [m_i]: every token the row took in the chunk, as the model read it
                           # (codes, [speech_end], and for <|advance|> the character fed in its place)


@dataclass
class Generation:
    """Every row's codes, once all rows have stopped."""

    codes: list[Tensor]    # LongTensor [n_i] of codec codes, without [speech_end]
    truncated: list[bool]
    tokens: list[Tensor]   # every token each row took after its `generation_start` prompt, as CodeChunk's


def frame_limit(num_text_tokens: int, base_frames: float, frames_per_text_token: float) -> int:
    """The length guard: at most base + per_token * (text tokens) frames of speech for a text.

    Speech length grows with the text; a limit a few times the typical rate leaves room for slow speech
    while cutting off a model that never stops."""
    return max(1, math.ceil(base_frames + frames_per_text_token * num_text_tokens))


def allowed_tokens(tok: SpeechTokenizer, num_logits: int) -> Tensor:
    """BoolTensor [num_logits]: the code block and [speech_end] (and <|advance|> for an interleaved model).
    Rows past the tokenizer's vocabulary (a padded output layer) and every text or control token stay
    masked."""
    if num_logits < tok.vocab_size:
        raise ValueError(f"the model has {num_logits} output rows, fewer than the tokenizer's "
                         f"{tok.vocab_size} tokens: model and tokenizer do not belong together")
    allowed = torch.zeros(num_logits, dtype=torch.bool)
    allowed[tok.code_offset: tok.vocab_size] = True
    allowed[tok.speech_end_id] = True
    if tok.interleaved:
        allowed[tok.advance_id] = True
    return allowed


def apply_repetition_penalty(logits: Tensor, recent: Tensor, penalty: float) -> Tensor:
    """Make tokens in `recent` ([B, W] token ids, -1 for none) less likely: positive logits are divided by
    the penalty, negative ones multiplied, so the penalty always lowers them (Keskar et al., 2019)."""
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, recent.clamp(min=0), (recent >= 0).to(logits.dtype))
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def filter_top_k(logits: Tensor, k: int | None) -> Tensor:
    if not k or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    # A token goes when the tokens before it already hold p; the most likely one never goes.
    drop = probs.cumsum(dim=-1) - probs >= p
    ordered = ordered.masked_fill(drop, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, ordered)


def guide(logits: Tensor, unconditional: Tensor, allowed: Tensor, tok: SpeechTokenizer,
          scale: float) -> Tensor:
    """Classifier-free guidance on the text (Ho & Salimans 2022; Koel-TTS for speech LMs): logits [B, V] given
    the text and `unconditional` [B, V] given the same speech without it -> log-probabilities [B, V] in which

        p(code) ~ p(code | text) * (p(code | text) / p(code | no text)) ** (scale - 1)

    over the code block. The codes that the text makes likelier gain, the ones any speech of this voice would
    say lose. The model's own odds of a code against [speech_end] or <|advance|> are kept: a stream without
    the text cannot say where the text ends."""
    log_probs = logits.masked_fill(~allowed, -math.inf).log_softmax(dim=-1)
    codes = slice(tok.code_offset, tok.vocab_size)
    with_text = log_probs[:, codes]
    without_text = unconditional[:, codes].log_softmax(dim=-1)
    steered = (with_text + (scale - 1) * (with_text - without_text)).log_softmax(dim=-1)
    log_probs[:, codes] = steered + with_text.logsumexp(dim=-1, keepdim=True)
    return log_probs


def next_tokens(logits: Tensor, allowed: Tensor, recent: Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None) -> Tensor:
    """logits [B, V] (float32) -> the next token id of each row, [B]."""
    logits = logits.masked_fill(~allowed, -math.inf)
    logits = apply_repetition_penalty(logits, recent, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def left_pad(prompts: Sequence[Prompt], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts -> (input_ids [B, L], attention_mask [B, L]), padded on the left so every row's next token
    is sampled from the same (last) position."""
    rows = [torch.as_tensor(np.asarray(p), dtype=torch.long).reshape(-1) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (build them with tts_prompt)")
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, longest - len(row):] = row
        mask[b, longest - len(row):] = 1
    return ids, mask


def _frame_limits(max_frames: int | Sequence[int], prompt_lengths: Tensor, context: int | None) -> Tensor:
    """Per-row limits [B], also capped so that no row runs past the model's position embeddings."""
    limits = torch.as_tensor(max_frames, dtype=torch.long).reshape(-1)
    if len(limits) not in (1, len(prompt_lengths)):
        raise ValueError(f"{len(limits)} max_frames for {len(prompt_lengths)} prompts")
    limits = limits.expand(len(prompt_lengths)).clone()
    if (limits < 1).any():
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if context is not None:
        room = context - prompt_lengths
        if (room < 1).any():
            raise ValueError(f"a prompt of {int(prompt_lengths.max())} tokens leaves no room in the model's "
                             f"{context} positions: use a shorter voice prompt or text")
        limits = torch.minimum(limits, room)
    return limits


@torch.no_grad()
def stream_codes(model: PreTrainedModel, tok: SpeechTokenizer, prompts: Sequence[Prompt],
                 max_frames: int | Sequence[int], sampling: SamplingConfig = SamplingConfig(),
                 chunk_frames: Sequence[int] = (1,),
                 spoken: Sequence[Sequence[int]] | None = None) -> Iterator[CodeChunk]:
    """Sample codes for a batch of prompts, yielding them in chunks as they are sampled.

    chunk_frames is the schedule of chunk sizes in decoding steps (the last size repeats), e.g. [10, 25, 50]:
    a small first chunk for a short time to first audio, then larger ones. A chunk also comes when the last
    row stops. max_frames: one limit for all rows or one per row (see `frame_limit`). spoken: each row's
    `tok.spoken_char_ids(text)`, for an interleaved tokenizer only. The model should be in eval mode; it is
    run as given. With `sampling.cfg_scale` > 1 each prompt gets a second row, its speech without the text
    (`unconditional_prompt`), which is fed the same codes, and the codes are drawn from `guide`.
    `sampling.advance_rate` sets an interleaved model's pace.
    """
    if not chunk_frames or min(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be positive sizes, got {list(chunk_frames)}")
    if tok.interleaved != (spoken is not None):
        raise ValueError("an interleaved SpeechLM needs each row's spoken characters (spoken=), and only it"
                         if tok.interleaved else "spoken= is for interleaved SpeechLMs; this one is plain")
    if sampling.advance_rate != 1.0 and not tok.interleaved:
        raise ValueError(f"sampling.advance_rate={sampling.advance_rate} sets the pace of interleaved "
                         "SpeechLMs (the odds of <|advance|>); this one is plain: leave it at 1.0")
    device = model.device
    batch, guided = len(prompts), sampling.cfg_scale != 1.0
    unconditional = [unconditional_prompt(tok, np.asarray(p)) for p in prompts] if guided else []
    feeds = None
    if spoken is not None:  # the first character(s) follow the prompt; the rest wait for <|advance|>
        if len(spoken) != len(prompts) or not all(len(row) for row in spoken):
            raise ValueError(f"need one non-empty list of spoken characters per prompt ({len(prompts)}), got "
                             f"{[len(row) for row in spoken]}: a text with nothing to say cannot be spoken")
        prompts, laters = zip(*(generation_start(tok, np.asarray(p), row)
                                for p, row in zip(prompts, spoken, strict=True)), strict=True)
        feeds = _right_pad(laters)
    ids, mask = left_pad([*prompts, *unconditional], tok.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    num_feeds = (feeds >= 0).sum(1) if feeds is not None else torch.zeros(batch, dtype=torch.long)
    limits = _frame_limits(max_frames, mask[:batch].sum(1).cpu() + num_feeds,
                           getattr(model.config, "max_position_embeddings", None)).to(device)
    max_steps = int((limits + num_feeds.to(device)).max())
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)

    # Prefill: positions count real tokens only, so a left-padded row sees the positions it would alone.
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    allowed = allowed_tokens(tok, out.logits.shape[-1]).to(device)[None].repeat(batch, 1)
    pace = None  # log-odds added to every row's logits when a pace is set
    if sampling.advance_rate != 1.0:
        pace = torch.zeros(out.logits.shape[-1], device=device)
        pace[tok.advance_id] = math.log(sampling.advance_rate)
    unguided = out.logits[batch:, -1].float()  # the unconditional rows' latest logits (guided only)
    if feeds is not None:
        feeds, num_feeds = feeds.to(device), num_feeds.to(device)
        next_feed = torch.zeros(batch, dtype=torch.long, device=device)  # index into each row's feeds
    next_position = mask.sum(1)
    made = torch.zeros(batch, dtype=torch.long, device=device)  # codes per row
    history = torch.full((batch, max_steps), -1, dtype=torch.long, device=device)  # code token ids
    taken = torch.full((batch, max_steps), -1, dtype=torch.long, device=device)  # all, as the model read them
    active = torch.ones(batch, dtype=torch.bool, device=device)
    truncated = torch.zeros(batch, dtype=torch.bool, device=device)
    window = sampling.repetition_window
    chunk_start, chunk_index = 0, 0

    for step in range(max_steps):
        recent = history[:, 0 if window is None else max(0, step - window): step]
        if feeds is not None:
            more = next_feed < num_feeds
            allowed[:, tok.advance_id], allowed[:, tok.speech_end_id] = more, ~more
        logits = out.logits[:batch, -1].float()
        if pace is not None:
            logits = logits + pace
        if guided:
            logits = guide(logits, unguided, allowed, tok, sampling.cfg_scale)
        token = next_tokens(logits, allowed, recent, sampling, generator)
        is_code = active & tok.is_code(token)
        advancing = active & (token == tok.advance_id) if feeds is not None else torch.zeros_like(active)
        sampled = token
        if feeds is not None:  # <|advance|> is said, the next character (or <|advance|> itself) is fed
            upcoming = feeds.gather(1, next_feed.clamp(max=max(feeds.shape[1] - 1, 0))[:, None])[:, 0]
            token = torch.where(advancing, upcoming, token)
            next_feed += advancing.long()
        taken[:, step] = torch.where(active, token, -1)
        history[:, step] = torch.where(is_code, token, -1)
        made += is_code.long()
        cut = is_code & (made >= limits)
        truncated |= cut
        active &= (is_code | advancing) & ~cut
        done = not bool(active.any())

        size = chunk_frames[min(chunk_index, len(chunk_frames) - 1)]
        if step + 1 - chunk_start == size or done:
            chunk = slice(chunk_start, step + 1)
            yield _chunk(history[:, chunk], taken[:, chunk], active, truncated, tok.code_offset)
            chunk_start, chunk_index = step + 1, chunk_index + 1
        if done:
            return
        # Stopped rows are fed padding that nothing attends to; their outputs are ignored from now on. So are
        # the unconditional rows' while their conditional row is given a character: they only hear codes.
        feeding = torch.cat([active, active & is_code]) if guided else active
        mask = torch.cat([mask, feeding[:, None].long()], dim=1)
        fed = torch.where(feeding, torch.cat([token, sampled]) if guided else token, tok.pad_id)[:, None]
        out = model(input_ids=fed, attention_mask=mask, position_ids=next_position[:, None],
                    cache=out.cache, use_cache=True, logits_to_keep=1)
        next_position = next_position + feeding.long()
        if guided:
            unguided = torch.where(feeding[batch:, None], out.logits[batch:, -1].float(), unguided)


def _right_pad(rows: Sequence[Sequence[int]]) -> Tensor:
    """Rows of ids right-padded with -1: LongTensor [B, longest] (at least one column)."""
    padded = torch.full((len(rows), max(1, *(len(row) for row in rows))), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        padded[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return padded


def _chunk(codes: Tensor, taken: Tensor, active: Tensor, truncated: Tensor, code_offset: int) -> CodeChunk:
    return CodeChunk([row[row >= 0] - code_offset for row in codes], (~active).tolist(), truncated.tolist(),
                     [row[row >= 0] for row in taken])


def generate_codes(model: PreTrainedModel, tok: SpeechTokenizer, prompts: Sequence[Prompt],
                   max_frames: int | Sequence[int], sampling: SamplingConfig = SamplingConfig(),
                   spoken: Sequence[Sequence[int]] | None = None) -> Generation:
    """Every row's complete codes (the same samples `stream_codes` yields for the same settings)."""
    codes: list[list[Tensor]] = [[] for _ in prompts]
    tokens: list[list[Tensor]] = [[] for _ in prompts]
    truncated = [False] * len(prompts)
    for chunk in stream_codes(model, tok, prompts, max_frames, sampling, chunk_frames=(64,), spoken=spoken):
        for row, (piece, taken) in enumerate(zip(chunk.codes, chunk.tokens, strict=True)):
            codes[row].append(piece)
            tokens[row].append(taken)
        truncated = chunk.truncated
    return Generation([torch.cat(pieces) for pieces in codes], truncated,
                      [torch.cat(pieces) for pieces in tokens])

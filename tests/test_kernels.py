"""Parity of the Mojo custom ops (kernels/voxlm_ops, run through MAX graphs) with their NumPy references,
edge cases, real speech for the silence detector, and agreement with generate.py's torch sampler.

Each graph is compiled once per test session (the `kernels` fixture); a cold compile takes ~20-30 s on
2 CPU cores, ~2 s from MAX's cache."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from voxlm.export import kernels as K
from voxlm.speechlm.generate import SamplingConfig, next_tokens

FRAME = 320          # 20 ms at 16 kHz: the one frame length the tests compile
SR = 16000
VOCAB, OFFSET, CODES = 1530, 520, 1000
SPEECH_END = 3


@pytest.fixture(scope="session")
def kernels() -> None:
    K.compile_kernels(FRAME)


def assert_same_trim(audio: np.ndarray, threshold_db: float, hangover: int) -> K.TrimResult:
    got = K.silence_trim(audio, FRAME, threshold_db, hangover)
    want = K.silence_trim_reference(audio, FRAME, threshold_db, hangover)
    assert (got.start, got.end) == (want.start, want.end)
    assert got.rms_db.dtype == np.float32 and got.rms_db.shape == want.rms_db.shape
    np.testing.assert_allclose(got.rms_db, want.rms_db, atol=1e-4)
    return got


def noise(n: int, db: float, seed: int) -> np.ndarray:
    """White noise with an RMS of `db` dBFS."""
    return (10 ** (db / 20) * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


# ---------------------------------------------------------------- silence detector

@pytest.mark.parametrize("seed,n,threshold_db,hangover", [
    (0, SR, -40.0, 2), (1, 10 * SR, -35.0, 0), (2, 12345, -45.0, 5), (3, 999, -40.0, 1),
    (4, 2 * SR + 7, -30.0, 3),
])
def test_silence_matches_reference_on_random_bursts(kernels: None, seed: int, n: int, threshold_db: float,
                                                     hangover: int) -> None:
    rng = np.random.default_rng(seed)
    audio = noise(n, -60, seed)
    for _ in range(3):  # loud bursts at random places over quiet noise
        begin = int(rng.integers(0, n))
        audio[begin: begin + int(rng.integers(1, n // 4 + 2))] *= 10 ** (rng.uniform(20, 50) / 20)
    got = assert_same_trim(audio, threshold_db, hangover)
    assert len(got.rms_db) == -(-n // FRAME)


def test_silence_all_silent_is_an_explicit_empty_region(kernels: None) -> None:
    for audio in (np.zeros(SR, np.float32), noise(SR, -70, 0)):
        got = assert_same_trim(audio, -40.0, 3)
        assert (got.start, got.end) == (0, 0) and got.empty
    assert assert_same_trim(np.zeros(SR, np.float32), -40.0, 0).rms_db.min() == pytest.approx(K.DB_FLOOR)


def test_silence_empty_clip(kernels: None) -> None:
    got = assert_same_trim(np.zeros(0, np.float32), -40.0, 2)
    assert (got.start, got.end, len(got.rms_db)) == (0, 0, 0)


@pytest.mark.parametrize("hangover", [0, 2])
def test_silence_only_at_start_or_end(kernels: None, hangover: int) -> None:
    loud, quiet = noise(SR, -20, 1), noise(SR // 2, -70, 2)
    got = assert_same_trim(np.concatenate([quiet, loud]), -40.0, hangover)   # silence only at the start
    assert got.start == len(quiet) - hangover * FRAME and got.end == len(quiet) + len(loud)
    got = assert_same_trim(np.concatenate([loud, quiet]), -40.0, hangover)   # silence only at the end
    assert got.start == 0 and got.end == len(loud) + hangover * FRAME


def test_silence_shorter_than_one_frame(kernels: None) -> None:
    got = assert_same_trim(noise(100, -20, 3), -40.0, 2)
    assert (got.start, got.end, len(got.rms_db)) == (0, 100, 1)
    got = assert_same_trim(noise(100, -70, 3), -40.0, 2)
    assert (got.start, got.end, len(got.rms_db)) == (0, 0, 1)


def test_silence_accepts_a_torch_tensor(kernels: None) -> None:
    audio = noise(SR, -20, 4)
    assert K.silence_trim(torch.from_numpy(audio), FRAME, -40.0, 0).end == SR


@pytest.mark.parametrize("hangover", [0, 2])
def test_silence_trims_real_speech_at_the_padding(kernels: None, tmp_path: Path, hangover: int) -> None:
    """flite speech, cut to its first/last sample above -40 dBFS, padded with 0.6 s / 0.9 s of -70 dBFS
    noise: the trim points land within two frames (plus the hangover) of the padding. The detector's
    threshold sits 5 dB under the cut because a frame's RMS lies under its peak (flite's decaying tail)."""
    wav = tmp_path / "slt.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", "The little boat drifted slowly across the quiet lake.",
                    "-o", str(wav)], check=True, capture_output=True)
    speech, sr = sf.read(wav, dtype="float32")
    assert sr == SR
    loud = np.flatnonzero(np.abs(speech) > 10 ** (-40 / 20))
    speech = speech[loud[0]: loud[-1] + 1]
    head, tail = int(0.6 * SR), int(0.9 * SR)
    audio = np.concatenate([noise(head, -70, 5), speech, noise(tail, -70, 6)])
    got = assert_same_trim(audio, -45.0, hangover)
    assert abs(got.start - (head - hangover * FRAME)) <= 2 * FRAME
    assert abs(got.end - (head + len(speech) + hangover * FRAME)) <= 2 * FRAME


# ---------------------------------------------------------------- sampler

def random_batch(seed: int, rows: int, history: int, scale: float = 3.0,
                 vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((rows, vocab))).astype(np.float32)
    hist = rng.integers(OFFSET, OFFSET + CODES, (rows, history))
    hist[rng.random((rows, history)) < 0.2] = -1   # empty slots
    if rows > 1:
        hist[0] = -1                               # a row with an empty history
    return logits, hist, rng.random(rows)


SETTINGS = [
    dict(temperature=1.0),                                                 # plain sampling
    dict(temperature=0.8, top_k=50, top_p=0.9, penalty=1.3),
    dict(temperature=0.0, penalty=1.2),                                    # greedy with penalty
    dict(temperature=0.0),                                                 # greedy, penalty 1
    dict(temperature=1.2, top_k=1),
    dict(temperature=0.7, top_p=1e-6),
    dict(temperature=1.0, top_p=0.5, penalty=1.0),
    dict(temperature=0.5, top_k=2000, penalty=0.8),                        # k beyond the vocab; penalty < 1
]


@pytest.mark.parametrize("speech_end, advance", [
    (SPEECH_END, -1), (OFFSET + CODES, -1), (OFFSET + 10, -1),      # speech_end before, after, inside
    (SPEECH_END, SPEECH_END - 1), (SPEECH_END - 1, SPEECH_END),     # and <|advance|> beside it, either order
    (SPEECH_END, OFFSET + CODES), (OFFSET + 10, SPEECH_END)])       # the two on either side; one inside
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_sampler_matches_reference(kernels: None, setting: int, speech_end: int, advance: int) -> None:
    params = K.CodeSamplerParams(OFFSET, CODES, speech_end, **SETTINGS[setting], advance=advance)
    for seed, rows, history in [(setting, 1, 16), (100 + setting, 8, 32), (200 + setting, 5, 0)]:
        logits, hist, u = random_batch(seed, rows, history)
        if advance >= 0 and history:  # the extra ids in a history: the penalty finds them wherever they lie
            hist[-1, :2] = [speech_end, advance]
        np.testing.assert_array_equal(K.sample_codes(logits, hist, u, params),
                                      K.sample_codes_reference(logits, hist, u, params))


def test_sampler_u_at_the_ends_and_peaked_rows(kernels: None) -> None:
    logits, hist, _ = random_batch(7, 8, 8, scale=30.0)   # nearly one-hot rows
    params = K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, temperature=1.0, top_p=0.95)
    for u in (np.zeros(8), np.full(8, np.nextafter(1.0, 0.0))):
        np.testing.assert_array_equal(K.sample_codes(logits, hist, u, params),
                                      K.sample_codes_reference(logits, hist, u, params))


def test_sampler_only_returns_codes_or_speech_end(kernels: None) -> None:
    logits, hist, u = random_batch(8, 64, 16)
    logits[:, :OFFSET] += 50.0   # text/control ids are the most likely ones: they must still never come out
    allowed = set(range(OFFSET, OFFSET + CODES)) | {SPEECH_END}
    for setting in SETTINGS:
        tokens = K.sample_codes(logits, hist, u, K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, **setting))
        assert tokens.dtype == np.int64 and set(tokens.tolist()) <= allowed


def test_sampler_takes_advance_only_where_the_bias_allows_it(kernels: None) -> None:
    """The interleaved format's rows: <|advance|> is a candidate, and a -inf bias per row masks it (or
    [speech_end]), as the server's steps do."""
    logits, hist, u = random_batch(11, 8, 16)
    advance = SPEECH_END - 1
    logits[:, [SPEECH_END, advance]] += 50.0  # both far more likely than any code
    params = K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, temperature=1.0, top_k=50, advance=advance)
    may_advance = np.arange(8) % 2 == 0
    biased = logits.copy()
    biased[may_advance, SPEECH_END] = -np.inf
    biased[~may_advance, advance] = -np.inf
    tokens = K.sample_codes(biased, hist, u, params)
    np.testing.assert_array_equal(tokens, np.where(may_advance, advance, SPEECH_END))
    plain = K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, temperature=1.0, top_k=50)
    assert advance not in K.sample_codes(logits, hist, u, plain).tolist()


def test_sampler_frequencies_follow_the_distribution(kernels: None) -> None:
    """A grid of u over [0, 1) reproduces the renormalized softmax of the allowed logits."""
    rows, vocab = 20000, 8
    logits = np.tile(np.array([5, 0.3, -1.0, 0.5, 1.2, -0.4, 0.9, 9], np.float32), (rows, 1))
    params = K.CodeSamplerParams(offset=2, num_codes=5, speech_end=0, temperature=1.0)
    tokens = K.sample_codes(logits, None, (np.arange(rows) + 0.5) / rows, params)
    ids = params.candidate_ids()
    probs = np.exp(logits[0, ids]) / np.exp(logits[0, ids]).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=vocab)[ids] / rows, probs, atol=2e-4)


def test_sampler_greedy_is_generate_next_tokens(kernels: None) -> None:
    logits, hist, u = random_batch(9, 8, 24)
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[OFFSET: OFFSET + CODES] = True
    allowed[SPEECH_END] = True
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.3)
    want = next_tokens(torch.from_numpy(logits), allowed, torch.from_numpy(hist), cfg, None)
    params = K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, temperature=0.0, penalty=1.3)
    got = K.sample_codes(torch.from_numpy(logits), torch.from_numpy(hist), torch.from_numpy(u), params)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)


def test_torch_path_agrees_with_reference() -> None:
    """The benchmark baseline runs the same steps (float32 filtering in torch): same tokens on random rows."""
    for setting in SETTINGS:
        params = K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, **setting)
        logits, hist, u = random_batch(10, 16, 16)
        want = K.sample_codes_reference(logits, hist, u, params)
        got = K.sample_codes_torch(torch.from_numpy(logits), torch.from_numpy(hist), torch.from_numpy(u),
                                   params)
        assert (got.numpy() == want).mean() >= 15 / 16, setting   # at most a rounding-boundary disagreement


def test_params_from_sampling_config() -> None:
    class Tok:
        code_offset, vocab_size, speech_end_id = OFFSET, OFFSET + CODES, SPEECH_END
        advance_id, interleaved = SPEECH_END - 1, False

    params = K.CodeSamplerParams.from_config(SamplingConfig(temperature=0.7, top_k=40, top_p=0.9,
                                                            repetition_penalty=1.1), Tok())
    assert params == K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, 0.7, 40, 0.9, 1.1)
    assert K.CodeSamplerParams.from_config(SamplingConfig(do_sample=False), Tok()).temperature == 0.0
    Tok.interleaved = True
    assert K.CodeSamplerParams.from_config(SamplingConfig(), Tok()).advance == SPEECH_END - 1


# ---------------------------------------------------------------- cached attention

def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] from HF's LlamaRotaryEmbedding (theta 10,000)."""
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, rope_theta=10000.0)
    return LlamaRotaryEmbedding(config)(torch.zeros(1), positions)


def attention_case(seed: int, batch: int, past: int, new: int, heads: int, kv_heads: int, head_dim: int,
                   padding: list[int]) -> dict[str, torch.Tensor]:
    """Random Q|K|V, a past, and a mask whose row b starts with padding[b] left-padding tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    for row, pad in enumerate(padding):
        mask[row, :pad] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]
    cos, sin = rope_tables(positions, head_dim)
    return {"qkv": torch.randn(batch, new, (heads + 2 * kv_heads) * head_dim, generator=g), "cos": cos,
            "sin": sin, "mask": mask, "k_past": torch.randn(batch, kv_heads, past, head_dim, generator=g),
            "v_past": torch.randn(batch, kv_heads, past, head_dim, generator=g)}


def caches_with_scratch(case: dict[str, torch.Tensor], capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Preallocated caches holding the past, NaN beyond it: a kernel that read or wrote past P + T would
    turn the output or the scratch check into NaNs."""
    caches = []
    for past in (case["k_past"], case["v_past"]):
        cache = torch.full((*past.shape[:2], capacity, past.shape[3]), float("nan"))
        cache[:, :, :past.shape[2]] = past
        caches.append(cache)
    return caches[0], caches[1]


@pytest.mark.parametrize("batch,past,new,heads,kv_heads,head_dim,padding", [
    (1, 0, 7, 4, 2, 64, [0]),                 # prefill
    (3, 0, 9, 4, 2, 64, [0, 4, 8]),           # left-padded prefill, one row with a single real token
    (2, 33, 1, 4, 2, 64, [0, 10]),            # a decode step
    (4, 20, 5, 2, 2, 16, [3, 0, 19, 0]),      # several new tokens after a past, no GQA, tiny's head size
    (8, 400, 1, 4, 2, 64, [0] * 8),           # the quickstart model's serving shape
])
def test_cached_attention_matches_reference(batch: int, past: int, new: int, heads: int, kv_heads: int,
                                            head_dim: int, padding: list[int]) -> None:
    case = attention_case(batch + past, batch, past, new, heads, kv_heads, head_dim, padding)
    capacity = past + new + 16
    k_cache, v_cache = caches_with_scratch(case, capacity)
    got = K.cached_attention(case["qkv"], case["cos"], case["sin"], case["mask"], k_cache, v_cache, heads,
                             kv_heads)
    want, keys, values = K.cached_attention_reference(**case, num_heads=heads, num_kv_heads=kv_heads)
    real = case["mask"][:, past:].bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-6, rtol=1e-5)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))      # padding queries: zeros, not NaN
    torch.testing.assert_close(k_cache[:, :, :past + new], keys, atol=1e-6, rtol=1e-6)
    assert torch.equal(v_cache[:, :, :past + new], values)
    assert k_cache[:, :, past + new:].isnan().all() and v_cache[:, :, past + new:].isnan().all()


def test_cached_attention_decode_steps_continue_the_cache() -> None:
    """Prefill and 6 decode steps through one preallocated cache equal attention recomputed from scratch."""
    heads, kv_heads, head_dim, batch = 4, 2, 64, 2
    full = attention_case(7, batch, 0, 12, heads, kv_heads, head_dim, [0, 3])
    k_cache, v_cache = caches_with_scratch(full, 32)
    K.cached_attention(full["qkv"][:, :6], full["cos"][:, :6], full["sin"][:, :6], full["mask"][:, :6],
                       k_cache, v_cache, heads, kv_heads)
    want, _, _ = K.cached_attention_reference(full["qkv"], full["cos"], full["sin"], full["mask"],
                                              full["k_past"], full["v_past"], heads, kv_heads)
    for t in range(6, 12):
        got = K.cached_attention(full["qkv"][:, t:t + 1], full["cos"][:, t:t + 1], full["sin"][:, t:t + 1],
                                 full["mask"][:, :t + 1], k_cache, v_cache, heads, kv_heads)
        torch.testing.assert_close(got[:, 0], want[:, t], atol=2e-6, rtol=1e-5)


def test_cached_attention_refuses_a_short_cache() -> None:
    case = attention_case(0, 1, 10, 1, 4, 2, 64, [0])
    k_cache, v_cache = caches_with_scratch(case, 10)   # no room for the new token
    with pytest.raises(ValueError, match="past \\+ new needs 11"):
        K.cached_attention(case["qkv"], case["cos"], case["sin"], case["mask"], k_cache, v_cache, 4, 2)

"""Sampling and streaming generation (voxlm.speechlm.generate), voices, and the synth.py command line.

Two kinds of tiny Llama: a random one (attention live: cache, left padding and positions all matter) and a
"bigram" one whose attention and MLP outputs are zeroed and whose output layer is set by hand, so that the
next token is a chosen function of the current one: stops, per-row stops and the length guard then happen
at known steps.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from voxlm.codec.model import Codec
from voxlm.data.dataset import Preprocess
from voxlm.eval.given_timing import codes_at_timings, codes_teacher_forced, mix_codes
from voxlm.speechlm.generate import (
    SamplingConfig,
    allowed_tokens,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    frame_limit,
    generate_codes,
    guide,
    stream_codes,
)
from voxlm.speechlm.model import build_model
from voxlm.speechlm.module import own_codes
from voxlm.speechlm.sequences import IGNORE, generation_start, tts_prompt, tts_sequence, unconditional_prompt
from voxlm.speechlm.tokenizer import SpeechTokenizer, train_text_tokenizer
from voxlm.speechlm.voices import (
    Voice,
    encode_voice,
    list_voices,
    load_reference_audio,
    load_voice,
    save_voice,
    voice_for_codec,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import synth  # noqa: E402

torch.set_num_threads(1)
CODEBOOK = 64  # the tiny codec's levels [4, 4, 4]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine, they say.",
    "Is it raining in Paris? I don't think so.",
    "She sells sea shells by the sea shore.",
]
GREEDY = SamplingConfig(do_sample=False)


@pytest.fixture(scope="module")
def tok() -> SpeechTokenizer:
    return SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK)


@pytest.fixture(scope="module")
def spoken_tok() -> SpeechTokenizer:
    """The interleaved format's tokenizer, saying letters."""
    return SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK,
                                 spoken_alphabet=" abcdefghijklmnopqrstuvwxyz'")


def tiny_lm(tok: SpeechTokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The tiny preset, untied (output rows set independently of the inputs) and with a padded vocabulary,
    so padded output rows exist for the sampler to mask."""
    cfg = OmegaConf.load(ROOT / "configs" / "speechlm" / "tiny.yaml").model
    cfg = {**OmegaConf.to_container(cfg), "tie_word_embeddings": False, "pad_vocab_to_multiple_of": 128,
           **overrides}
    torch.manual_seed(seed)
    return build_model(cfg, len(tok), tok.layout.special_ids).eval()


@pytest.fixture(scope="module")
def random_lm(tok: SpeechTokenizer) -> LlamaForCausalLM:
    """Random weights, sharper than the preset's init so that argmax ties cannot hide a wrong path; the
    [speech_end] output row is zeroed (logit 0) so greedy rows run long rather than stopping at once."""
    model = tiny_lm(tok, initializer_range=0.2)
    with torch.no_grad():
        model.lm_head.weight[tok.speech_end_id] = 0
    return model


def bigram_lm(tok: SpeechTokenizer, successor: dict[int, int]) -> LlamaForCausalLM:
    """A Llama whose next token is successor[current token] (near-deterministically, even when sampling).

    With every attention and MLP output projection zeroed, the last hidden state is the current token's
    embedding, RMS-normalized; output row j = the normalized embedding of j's predecessor makes j's logit
    the dimension (64) for that predecessor, against ~N(0, 8) for any other input; a row with two
    predecessors is their sum."""
    model = tiny_lm(tok, seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        normalized = embeddings / embeddings.pow(2).mean(-1, keepdim=True).sqrt()
        model.lm_head.weight.zero_()
        for current, following in successor.items():
            model.lm_head.weight[following] += normalized[current]  # a token may have two predecessors
    return model


@torch.no_grad()
def second_choice(model: LlamaForCausalLM, after: int, token: int) -> None:
    """A bigram_lm's `token` made the second choice after `after`, at half the first one's logit."""
    embed = model.model.embed_tokens.weight[after]
    model.lm_head.weight[token] += 0.5 * embed / embed.pow(2).mean().sqrt()


def code(tok: SpeechTokenizer, c: int) -> int:
    return tok.code_offset + c


def chain(tok: SpeechTokenizer, start: int, codes: list[int], end: int | None) -> dict[int, int]:
    """start -> codes[0] -> codes[1] -> ... -> end (token ids; codes given as codec codes)."""
    tokens = [start, *(code(tok, c) for c in codes)] + ([end] if end is not None else [])
    return dict(zip(tokens[:-1], tokens[1:], strict=True))


def reference_greedy(model: LlamaForCausalLM, tok: SpeechTokenizer, prompt: np.ndarray,
                     steps: int) -> list[int]:
    """The argmax path of a plain forward over the whole sequence each step: no cache, no padding."""
    ids = torch.as_tensor(prompt)[None]
    allowed = allowed_tokens(tok, model.config.vocab_size)
    codes = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[0, -1].masked_fill(~allowed, -math.inf)
            token = int(logits.argmax())
            if token == tok.speech_end_id:
                break
            codes.append(token - tok.code_offset)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return codes


def prompts(tok: SpeechTokenizer) -> list[np.ndarray]:
    """Three prompts of different lengths: with and without a voice prompt."""
    rng = np.random.default_rng(0)
    return [tts_prompt(tok, "Hello there.", "She sells sea shells.", rng.integers(0, CODEBOOK, 9)),
            tts_prompt(tok, "Is it raining in Paris?"),
            tts_prompt(tok, "A stitch in time.", "Nine.", rng.integers(0, CODEBOOK, 3))]


# --- sampling pieces ---------------------------------------------------------------------------------------

def test_allowed_tokens_are_the_code_block_and_speech_end(tok: SpeechTokenizer) -> None:
    allowed = allowed_tokens(tok, len(tok) + 11)  # a padded output layer
    expected = set(range(tok.code_offset, len(tok))) | {tok.speech_end_id}
    assert set(torch.nonzero(allowed).flatten().tolist()) == expected
    with pytest.raises(ValueError, match="do not belong together"):
        allowed_tokens(tok, len(tok) - 1)


def test_logit_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.4)).tolist() == [[True, False, False, False]]
    assert torch.equal(filter_top_k(logits, None), logits) and torch.equal(filter_top_p(logits, 1.0), logits)
    recent = torch.tensor([[0, 2, -1, 2]])  # -1: no code there yet
    penalized = apply_repetition_penalty(torch.tensor([[2.0, 1.0, -1.0, 3.0]]), recent, 2.0)
    assert penalized.tolist() == [[1.0, 1.0, -2.0, 3.0]]


def test_guidance_reweights_the_codes_by_what_the_text_adds(tok: SpeechTokenizer) -> None:
    """p(code) ~ p(code | text) * (p(code | text) / p(code | no text)) ** (scale - 1) over the codes; the
    odds of a code against [speech_end] stay the conditional model's."""
    allowed = allowed_tokens(tok, len(tok))[None]
    torch.manual_seed(0)
    with_text, without_text = torch.randn(1, len(tok)) * 3, torch.randn(1, len(tok)) * 3
    codes = slice(tok.code_offset, len(tok))
    guided = guide(with_text, without_text, allowed, tok, 3.0)
    conditional = with_text.masked_fill(~allowed, -math.inf).log_softmax(-1)
    assert torch.isclose(guided.logsumexp(-1), torch.zeros(1), atol=1e-5).all()
    assert torch.isclose(guided[0, tok.speech_end_id], conditional[0, tok.speech_end_id])
    assert torch.isinf(guided[~allowed]).all()
    steered = conditional[0, codes] + 2.0 * (conditional[0, codes] - without_text[0, codes].log_softmax(-1))
    expected = steered.softmax(-1) * conditional[0, codes].exp().sum()
    assert torch.allclose(guided[0, codes].exp(), expected, atol=1e-6)
    # Where the text changes nothing, nothing changes.
    assert torch.allclose(guide(with_text, with_text, allowed, tok, 3.0), conditional, atol=1e-5)
    assert torch.allclose(guide(with_text, without_text, allowed, tok, 1.0), conditional, atol=1e-5)
    with pytest.raises(ValueError, match="guidance scales start at 1.0"):
        SamplingConfig(cfg_scale=0.5)


def reference_guided(model: LlamaForCausalLM, tok: SpeechTokenizer, prompt: np.ndarray, scale: float,
                     steps: int, spoken: list[int] | None = None) -> tuple[list[int], int]:
    """Guided greedy decoding from two full forwards per step, no cache: the prompt (with its characters,
    fed at each <|advance|>) and the same codes after [bos] [speech_start] and the voice prompt's codes.
    Returns the codes and how many characters were fed after the first."""
    start, feeds = generation_start(tok, prompt, spoken)
    conditional, unconditional = list(start), list(unconditional_prompt(tok, prompt))
    allowed = allowed_tokens(tok, model.config.vocab_size)
    codes: list[int] = []
    advances = 0
    with torch.no_grad():
        while len(codes) < steps:
            if tok.interleaved:
                allowed[tok.advance_id], allowed[tok.speech_end_id] = bool(feeds), not feeds
            logits = [model(input_ids=torch.tensor([ids])).logits[:, -1]
                      for ids in (conditional, unconditional)]
            token = int(guide(*logits, allowed[None], tok, scale).argmax())
            if token == tok.speech_end_id:
                break
            if token == getattr(tok, "advance_id", None):
                conditional.append(feeds.pop(0))
                advances += 1
                continue
            codes.append(token - tok.code_offset)
            conditional.append(token)
            unconditional.append(token)
    return codes, advances


def test_guided_generation_equals_two_full_recomputes(tok: SpeechTokenizer,
                                                      random_lm: LlamaForCausalLM,
                                                      spoken_tok: SpeechTokenizer) -> None:
    """The unconditional rows share the batch (left padding, cache) with their prompts, hear every code and
    no character: plain rows of different lengths, and interleaved rows that advance."""
    guided = SamplingConfig(do_sample=False, cfg_scale=2.5)
    rows = prompts(tok)
    generated = generate_codes(random_lm, tok, rows, 12, guided)
    for row, codes in zip(rows, generated.codes, strict=True):
        assert codes.tolist() == reference_guided(random_lm, tok, row, 2.5, 12)[0]
    unguided = generate_codes(random_lm, tok, rows[:1], 12, GREEDY)
    assert generated.codes[0].tolist() != unguided.codes[0].tolist()

    model = tiny_lm(spoken_tok, initializer_range=0.2)
    with torch.no_grad():  # <|advance|> made likely enough that rows move on now and then
        codes_mean = model.lm_head.weight[spoken_tok.code_offset:].mean(0)
        model.lm_head.weight[spoken_tok.advance_id] = codes_mean * 40
    texts = ["Hi there.", "A stitch in time saves nine."]
    rows = [tts_prompt(spoken_tok, text, None if i else "x", None if i else np.arange(5))
            for i, text in enumerate(texts)]
    spoken = [spoken_tok.spoken_char_ids(text) for text in texts]
    generated = generate_codes(model, spoken_tok, rows, 20, guided, spoken=spoken)
    for row, chars, codes in zip(rows, spoken, generated.codes, strict=True):
        expected, advances = reference_guided(model, spoken_tok, row, 2.5, 20, chars)
        assert codes.tolist() == expected and advances > 1


def test_frame_limit_grows_with_text() -> None:
    assert frame_limit(0, 20, 5) == 20
    assert frame_limit(10, 20, 5.5) == 75
    assert frame_limit(0, 0, 1) == 1


# --- greedy, sampling and streaming on the random model ----------------------------------------------------

def test_greedy_equals_full_recompute_argmax(tok: SpeechTokenizer, random_lm: LlamaForCausalLM) -> None:
    prompt = prompts(tok)[0]
    generated = generate_codes(random_lm, tok, [prompt], max_frames=24, sampling=GREEDY)
    expected = reference_greedy(random_lm, tok, prompt, steps=24)
    assert len(expected) == 24 and len(set(expected)) > 3  # a real path, not one code repeated
    assert generated.codes[0].tolist() == expected
    assert generated.truncated == [True]  # [speech_end] never wins here: the guard cut it
    # temperature 0 is greedy too, whatever do_sample says
    again = generate_codes(random_lm, tok, [prompt], 24, SamplingConfig(temperature=0.0, seed=3))
    assert again.codes[0].tolist() == expected


def test_batched_rows_equal_unbatched_rows(tok: SpeechTokenizer, random_lm: LlamaForCausalLM) -> None:
    rows = prompts(tok)
    limits = [12, 20, 16]
    batched = generate_codes(random_lm, tok, rows, limits, GREEDY)
    for prompt, limit, codes in zip(rows, limits, batched.codes, strict=True):
        alone = generate_codes(random_lm, tok, [prompt], limit, GREEDY)
        assert codes.tolist() == alone.codes[0].tolist()
        assert len(codes) == limit
    assert batched.truncated == [True, True, True]


def test_seed_makes_sampling_reproducible(tok: SpeechTokenizer, random_lm: LlamaForCausalLM) -> None:
    rows = prompts(tok)[:2]

    def sample(seed: int) -> list[list[int]]:
        cfg = SamplingConfig(temperature=1.2, top_k=40, top_p=0.95, repetition_penalty=1.3,
                             repetition_window=8, seed=seed)
        return [c.tolist() for c in generate_codes(random_lm, tok, rows, 30, cfg).codes]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != [c.tolist() for c in generate_codes(random_lm, tok, rows, 30, GREEDY).codes]


def test_streaming_yields_the_same_codes(tok: SpeechTokenizer, random_lm: LlamaForCausalLM) -> None:
    rows = prompts(tok)
    cfg = SamplingConfig(temperature=1.0, top_k=20, seed=11)
    whole = generate_codes(random_lm, tok, rows, [9, 14, 5], cfg)
    chunks = list(stream_codes(random_lm, tok, rows, [9, 14, 5], cfg, chunk_frames=[2, 5]))
    # Schedule: 2 steps, then 5 at a time; row 2 (5 frames) finishes inside the second chunk.
    assert [len(c.codes[1]) for c in chunks] == [2, 5, 5, 2]
    assert [c.finished[2] for c in chunks] == [False, True, True, True]
    assert [len(c.codes[2]) for c in chunks] == [2, 3, 0, 0]
    assert chunks[-1].finished == [True, True, True]
    for row in range(len(rows)):
        streamed = torch.cat([c.codes[row] for c in chunks])
        assert streamed.tolist() == whole.codes[row].tolist()


def test_only_codes_and_speech_end_are_ever_sampled(tok: SpeechTokenizer) -> None:
    """A model that strongly prefers text, control and padded-vocabulary tokens still yields only codes."""
    model = tiny_lm(tok, seed=2)
    forbidden = torch.ones(model.config.vocab_size, dtype=torch.bool)
    forbidden[allowed_tokens(tok, model.config.vocab_size)] = False
    assert forbidden[len(tok):].any()  # padded rows exist
    with torch.no_grad():
        # Every input carries +10 in dimension 0, and every forbidden output row reads dimension 0 only.
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[forbidden] = 0.0
        model.lm_head.weight[forbidden, 0] = 5.0
        unmasked = model(input_ids=torch.as_tensor(prompts(tok)[1])[None]).logits[0, -1]
    assert forbidden[unmasked.argmax()], "the test model must prefer a forbidden token"
    cfg = SamplingConfig(temperature=3.0, seed=0)
    generated = generate_codes(model, tok, prompts(tok), 40, cfg)
    for codes in generated.codes:
        assert ((codes >= 0) & (codes < CODEBOOK)).all()
    assert sum(len(c) for c in generated.codes) > 10


# --- stopping and the length guard on the bigram model -----------------------------------------------------

def test_rows_stop_at_speech_end_independently(tok: SpeechTokenizer) -> None:
    # [speech_start] -> c0 -> c1 -> ... -> c9 -> [speech_end]: a prompt ending in c5 stops after c6..c9.
    model = bigram_lm(tok, chain(tok, tok.speech_start_id, list(range(10)), tok.speech_end_id))
    rows = [tts_prompt(tok, "Hello.", "Ref.", np.array([3, 5])), tts_prompt(tok, "A longer text here.")]
    for sampling in (GREEDY, SamplingConfig(seed=0)):
        generated = generate_codes(model, tok, rows, 50, sampling)
        assert [c.tolist() for c in generated.codes] == [[6, 7, 8, 9], list(range(10))]
        assert generated.truncated == [False, False]
        assert generated.tokens[0].tolist() == [code(tok, c) for c in (6, 7, 8, 9)] + [tok.speech_end_id]
    chunks = list(stream_codes(model, tok, rows, 50, GREEDY, chunk_frames=[3]))
    assert [c.finished for c in chunks] == [[False, False], [True, False], [True, False], [True, True]]
    assert [len(c.codes[0]) for c in chunks] == [3, 1, 0, 0]
    # The same rows alone stop at the same codes.
    assert generate_codes(model, tok, rows[:1], 50, GREEDY).codes[0].tolist() == [6, 7, 8, 9]


def test_length_guard_cuts_a_model_that_never_stops(tok: SpeechTokenizer) -> None:
    successor = chain(tok, tok.speech_start_id, [0, 1, 2], None) | {code(tok, 2): code(tok, 0)}  # a cycle
    model = bigram_lm(tok, successor)
    rows = [tts_prompt(tok, "Hello."), tts_prompt(tok, "Bye.")]
    generated = generate_codes(model, tok, rows, [7, 3], SamplingConfig(seed=0))
    assert [c.tolist() for c in generated.codes] == [[0, 1, 2, 0, 1, 2, 0], [0, 1, 2]]
    assert generated.truncated == [True, True]
    assert generated.tokens[1].tolist() == [code(tok, c) for c in (0, 1, 2)]  # cut: no [speech_end]
    # The model's context caps the budget as well.
    model.config.max_position_embeddings = len(rows[0]) + 4
    capped = generate_codes(model, tok, rows[:1], 100, GREEDY)
    assert len(capped.codes[0]) == 4 and capped.truncated == [True]
    model.config.max_position_embeddings = len(rows[0])
    with pytest.raises(ValueError, match="no room"):
        generate_codes(model, tok, rows[:1], 100, GREEDY)


def test_interleaved_rows_are_fed_their_characters_in_order(tok: SpeechTokenizer,
                                                            spoken_tok: SpeechTokenizer) -> None:
    """In the interleaved format the model says <|advance|> and the next character is fed; it cannot stop
    before the last one nor advance past it. 'h' -> [speech_end] (preferred) or c5; c5 -> <|advance|>;
    'i' -> c2; c2 -> <|advance|> (preferred) or [speech_end]."""
    h, i = spoken_tok.char_ids["h"], spoken_tok.char_ids["i"]
    model = bigram_lm(spoken_tok, {h: spoken_tok.speech_end_id, code(spoken_tok, 5): spoken_tok.advance_id,
                                   i: code(spoken_tok, 2), code(spoken_tok, 2): spoken_tok.advance_id})
    with torch.no_grad():  # the second choices, at half the logit
        normalized = model.model.embed_tokens.weight / model.model.embed_tokens.weight.pow(2).mean(
            -1, keepdim=True).sqrt()
        model.lm_head.weight[code(spoken_tok, 5)] += 0.5 * normalized[h]
        model.lm_head.weight[spoken_tok.speech_end_id] += 0.5 * normalized[code(spoken_tok, 2)]
    texts = ["Hi!", "h i i"]  # spoken: "hi" and "h i i" (spaces are characters too; ' ' -> anything)
    rows = [tts_prompt(spoken_tok, text) for text in texts]
    spoken = [spoken_tok.spoken_char_ids(text) for text in texts]
    assert spoken[0] == [h, i]
    generated = generate_codes(model, spoken_tok, rows, 50, GREEDY, spoken=spoken)
    assert generated.codes[0].tolist() == [5, 2] and generated.truncated == [False, False]
    # As the model read it: 'h' was in the prompt; the <|advance|> after c5 was read as 'i'.
    assert generated.tokens[0].tolist() == [code(spoken_tok, 5), i, code(spoken_tok, 2),
                                            spoken_tok.speech_end_id]
    said = generated.codes[1].tolist()
    assert said[0] == 5 and said.count(2) == 2 and said[-1] == 2, said
    alone = generate_codes(model, spoken_tok, rows[:1], 50, SamplingConfig(seed=0), spoken=spoken[:1])
    assert alone.codes[0].tolist() == [5, 2]
    with pytest.raises(ValueError, match="needs each row's spoken characters"):
        generate_codes(model, spoken_tok, rows, 50, GREEDY)
    with pytest.raises(ValueError, match="for interleaved SpeechLMs"):
        generate_codes(model, tok, [tts_prompt(tok, "Hi!")], 50, GREEDY, spoken=spoken[:1])
    with pytest.raises(ValueError, match="nothing to say"):
        generate_codes(model, spoken_tok, rows[:1], 50, GREEDY, spoken=[[]])


def test_advance_rate_sets_the_pace_of_an_interleaved_model(tok: SpeechTokenizer,
                                                           spoken_tok: SpeechTokenizer) -> None:
    """'h' -> c1; c1 -> <|advance|> (logit 64) or c4 (32); 'i' -> c3. At the model's own odds it says c1 c3.
    Scaling the odds of moving on by e^-20 leaves <|advance|> ahead (44 > 32); by e^-40 the model dwells on
    'h' and says c4, where the length guard (2 codes) stops it."""
    h, i = spoken_tok.char_ids["h"], spoken_tok.char_ids["i"]
    model = bigram_lm(spoken_tok, {h: code(spoken_tok, 1), code(spoken_tok, 1): spoken_tok.advance_id,
                                   i: code(spoken_tok, 3), code(spoken_tok, 3): spoken_tok.speech_end_id})
    second_choice(model, after=code(spoken_tok, 1), token=code(spoken_tok, 4))
    prompt, spoken = tts_prompt(spoken_tok, "hi"), [spoken_tok.spoken_char_ids("hi")]

    def said(rate: float) -> list[int]:
        sampling = SamplingConfig(do_sample=False, advance_rate=rate)
        return generate_codes(model, spoken_tok, [prompt], 2, sampling, spoken=spoken).codes[0].tolist()

    assert said(1.0) == [1, 3] and said(math.exp(-20)) == [1, 3]
    assert said(math.exp(-40)) == [1, 4]
    with pytest.raises(ValueError, match="sets the pace of interleaved SpeechLMs"):
        generate_codes(tiny_lm(tok), tok, [tts_prompt(tok, "Hi!")], 5, SamplingConfig(advance_rate=0.5))
    with pytest.raises(ValueError, match="must be positive"):
        SamplingConfig(advance_rate=0.0)


def test_lookahead_rows_are_fed_ahead_and_told_where_each_character_begins(tok: SpeechTokenizer) -> None:
    """Lookahead 1, "hii": [h, i] follow the prompt, the first <|advance|> brings the last 'i', the second
    brings <|advance|> itself. 'i' -> c5; c5 -> [speech_end] (preferred) or <|advance|>; <|advance|> -> c2;
    c2 -> <|advance|> (preferred, but no character is left) or [speech_end]. So: c5, c5, c2, stop."""
    spoken_tok = SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK,
                                       spoken_alphabet=" abcdefghijklmnopqrstuvwxyz'", lookahead=1)
    i, adv, end = spoken_tok.char_ids["i"], spoken_tok.advance_id, spoken_tok.speech_end_id
    c5, c2 = code(spoken_tok, 5), code(spoken_tok, 2)
    model = bigram_lm(spoken_tok, {i: c5, c5: end, adv: c2, c2: adv})
    with torch.no_grad():  # the second choices, at half the logit
        embed = model.model.embed_tokens.weight
        normalized = embed / embed.pow(2).mean(-1, keepdim=True).sqrt()
        model.lm_head.weight[adv] += 0.5 * normalized[c5]
        model.lm_head.weight[end] += 0.5 * normalized[c2]
    rows = [tts_prompt(spoken_tok, "hii")] * 2
    spoken = [spoken_tok.spoken_char_ids("hii")] * 2
    generated = generate_codes(model, spoken_tok, rows, 50, GREEDY, spoken=spoken)
    assert [c.tolist() for c in generated.codes] == [[5, 5, 2]] * 2 and generated.truncated == [False] * 2
    assert generated.tokens[0].tolist() == [c5, i, c5, adv, c2, end]  # the last <|advance|> is read as itself


def test_given_timings_feed_each_character_at_its_frame(tok: SpeechTokenizer,
                                                        spoken_tok: SpeechTokenizer) -> None:
    """voxlm.eval.given_timing: 'h' at frame 0 and 'i' at frame 2 of 4, whatever the model would rather
    do. h -> c1; c1 -> [speech_end] (preferred, never sampled here) or c4; 'i' -> c7; c7 -> c2."""
    h, i, end = spoken_tok.char_ids["h"], spoken_tok.char_ids["i"], spoken_tok.speech_end_id
    model = bigram_lm(spoken_tok, {h: code(spoken_tok, 1), code(spoken_tok, 1): end,
                                   i: code(spoken_tok, 7), code(spoken_tok, 7): code(spoken_tok, 2)})
    second_choice(model, after=code(spoken_tok, 1), token=code(spoken_tok, 4))
    prompt = tts_prompt(spoken_tok, "hi")
    codes = codes_at_timings(model, spoken_tok, prompt, [h, i], [0, 2], 4, GREEDY)
    assert codes.tolist() == [1, 4, 7, 2]
    with pytest.raises(ValueError, match="one start per character"):
        codes_at_timings(model, spoken_tok, prompt, [h, i], [0], 4, GREEDY)
    with pytest.raises(ValueError, match="no code for the last character"):
        codes_at_timings(model, spoken_tok, prompt, [h, i], [0, 2], 2, GREEDY)
    with pytest.raises(ValueError, match="for interleaved SpeechLMs"):
        codes_at_timings(model, tok, tts_prompt(tok, "hi"), [h, i], [0, 2], 4, GREEDY)
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        codes_at_timings(model, spoken_tok, prompt, [h, i], [0, 2], 4, SamplingConfig(cfg_scale=2.0))


def test_teacher_forcing_predicts_each_code_from_the_recordings_history(spoken_tok: SpeechTokenizer) -> None:
    """voxlm.eval.given_timing.codes_teacher_forced: h -> c1 -> c4 (speech_end masked) -> c9, 'i' at frame 3
    -> c7. Speaking freely says c1 c4 c9 c7; predicting a recording c1 c1 c1 c5 one step at a time says
    c4 after its c1, not c9, and c7 after 'i' whatever came before."""
    h, i, end = spoken_tok.char_ids["h"], spoken_tok.char_ids["i"], spoken_tok.speech_end_id
    model = bigram_lm(spoken_tok, {h: code(spoken_tok, 1), code(spoken_tok, 1): end,
                                   code(spoken_tok, 4): code(spoken_tok, 9), i: code(spoken_tok, 7)})
    second_choice(model, after=code(spoken_tok, 1), token=code(spoken_tok, 4))
    prompt = tts_prompt(spoken_tok, "hi")
    free = codes_at_timings(model, spoken_tok, prompt, [h, i], [0, 3], 4, GREEDY)
    assert free.tolist() == [1, 4, 9, 7]
    recording = np.array([1, 1, 1, 5])
    forced = codes_teacher_forced(model, spoken_tok, prompt, [h, i], [0, 3], recording, GREEDY)
    assert forced.tolist() == [1, 4, 4, 7]
    # Given its own free-running codes as the recording, it says them again.
    assert codes_teacher_forced(model, spoken_tok, prompt, [h, i], [0, 3], free.numpy(), GREEDY).equal(free)
    with pytest.raises(ValueError, match="no code for the last character"):
        codes_teacher_forced(model, spoken_tok, prompt, [h, i], [0, 3], recording[:3], GREEDY)


def test_mixing_takes_a_share_of_frames_from_the_picks_and_a_larger_share_keeps_them() -> None:
    """voxlm.eval.given_timing.mix_codes: the frames whose draw falls under the share come from the picks;
    draws shared across shares make each larger share replace a superset of the frames."""
    recording, picks = np.arange(6), np.arange(6) + 100
    draws = np.array([0.05, 0.9, 0.25, 0.5, 0.15, 0.99])
    assert mix_codes(recording, picks, 0.0, draws).tolist() == recording.tolist()
    assert mix_codes(recording, picks, 0.2, draws).tolist() == [100, 1, 2, 3, 104, 5]
    assert mix_codes(recording, picks, 0.6, draws).tolist() == [100, 1, 102, 103, 104, 5]
    assert mix_codes(recording, picks, 1.0, draws).tolist() == picks.tolist()
    with pytest.raises(ValueError, match="one pick and one draw per recorded frame"):
        mix_codes(recording, picks[:5], 0.5, draws)
    with pytest.raises(ValueError, match=r"share 1.5 is not in \[0, 1\]"):
        mix_codes(recording, picks, 1.5, draws)


def test_scheduled_sampling_puts_the_models_own_codes_into_the_targets_history(tok: SpeechTokenizer) -> None:
    """voxlm.speechlm.module.own_codes on the bigram model c -> c+1 (mod 10): a voice prompt of c3s, then a
    target of 200 c0s. Each replaced code is what the model says after the code before it: c4 after the
    prompt's last c3, c1 after a c0; a second pass samples after the first pass's codes (c5 after c4, c2 after
    c1). Unlabelled prompt codes, text and [speech_end] stay."""
    successor = {code(tok, c): code(tok, (c + 1) % 10) for c in range(10)}
    model = bigram_lm(tok, successor)
    example = tts_sequence(tok, "Hello.", np.zeros(200, np.int64), "Ref.", np.full(6, 3))
    ids, labels = torch.from_numpy(example.input_ids)[None], torch.from_numpy(example.labels)[None]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    target = (labels != IGNORE) & (ids >= tok.code_offset) & (ids < tok.code_offset + CODEBOOK)
    first = int(target[0].nonzero()[0])

    def sampled(share: float, passes: int) -> torch.Tensor:
        return own_codes(model, batch, tok.code_offset, CODEBOOK, share, 0.8, 50, passes)

    torch.manual_seed(0)
    once = sampled(1.0, 1)
    assert torch.equal(once[~target], ids[~target])
    assert once[0, first] == code(tok, 4)
    assert (once[0, first + 1:][target[0, first + 1:]] == code(tok, 1)).all()
    twice = sampled(1.0, 2)
    assert twice[0, first: first + 3].tolist() == [code(tok, 4), code(tok, 5), code(tok, 2)]
    assert (twice[0, first + 2:][target[0, first + 2:]] == code(tok, 2)).all()
    half = sampled(0.5, 1)
    replaced = half != ids
    assert not replaced[~target].any() and (half[replaced] == once[replaced]).all()
    assert 0.4 < float(replaced[target].float().mean()) < 0.6
    assert torch.equal(sampled(1e-9, 3), ids)  # nothing drawn: the history stays the recording's


# --- voices ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    cfg = OmegaConf.load(ROOT / "configs" / "codec" / "tiny.yaml").model
    return Codec(**OmegaConf.to_container(cfg)).eval()


@pytest.fixture(scope="module")
def reference_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.6 s of a gliding tone at 22.05 kHz between silences: loading resamples it, preprocessing trims it."""
    rate = 22050
    t = np.arange(int(0.6 * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    audio = np.concatenate([np.zeros(rate // 4), tone, np.zeros(rate // 4)]).astype(np.float32)
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    sf.write(path, audio, rate)
    return path


def test_voice_from_wav_saves_and_loads(codec: Codec, reference_wav: Path, tmp_path: Path) -> None:
    voice, audio = encode_voice(codec, reference_wav, "Hello there.", "alice", speaker="a",
                                preprocess=Preprocess())
    assert voice.codes.dtype == np.int64 and len(voice.codes) == math.ceil(len(audio) / codec.hop_length)
    assert 0.6 < len(audio) / codec.sample_rate < 0.9  # resampled to 16 kHz, silences trimmed to the margin
    assert ((voice.codes >= 0) & (voice.codes < CODEBOOK)).all()
    save_voice(voice, tmp_path, audio)
    assert list_voices(tmp_path) == ["alice"]
    for reference in ("alice", tmp_path / "alice"):
        loaded = load_voice(reference, tmp_path)
        np.testing.assert_array_equal(loaded.codes, voice.codes)
        assert (loaded.text, loaded.speaker, loaded.frame_rate) == ("Hello there.", "a", codec.frame_rate)
    # The saved reference re-encodes to the same codes (up to 16-bit rounding of the wav).
    again, _ = encode_voice(codec, tmp_path / "alice" / "reference.wav", "Hello there.", "alice2")
    assert np.mean(again.codes == voice.codes) > 0.9
    with pytest.raises(FileNotFoundError, match="voices in .*: alice"):
        load_voice("bob", tmp_path)
    with pytest.raises(ValueError, match="bad voice name"):
        save_voice(Voice("../x", "t", voice.codes, CODEBOOK, 100.0, 16000), tmp_path)
    other = Codec(**{**codec.config, "levels": [4, 4, 2]})
    with pytest.raises(ValueError, match="rebuild the voice"):
        loaded.check_codec(other)


def test_a_voice_of_another_codec_is_encoded_again(codec: Codec, reference_wav: Path, tmp_path: Path) -> None:
    """Codecs of one shape trained apart give the same sound other codes: a voice names the codec that made
    it, and is encoded again from its reference recording for another (by synth.py, the server and export),
    or refused when it kept none."""
    from voxlm.export.build import copy_voices

    voice, audio = encode_voice(codec, reference_wav, "Hello there.", "alice", preprocess=Preprocess())
    save_voice(voice, tmp_path / "voices", audio)
    loaded = load_voice("alice", tmp_path / "voices")
    assert loaded.codec_id == voice.codec_id == codec.code_fingerprint()
    twin = Codec(**codec.config)
    twin.load_state_dict(codec.state_dict())
    assert twin.code_fingerprint() == codec.code_fingerprint()  # the weights name the codec, not the object
    with torch.no_grad():
        twin.decoder.head.weight.add_(0.1)
    assert twin.code_fingerprint() == codec.code_fingerprint()  # a decoder tuned apart reads the same codes
    torch.manual_seed(1)
    retrained = Codec(**codec.config).eval()  # same shape and codebook, other weights
    assert retrained.code_fingerprint() != codec.code_fingerprint()
    with pytest.raises(ValueError, match="another codec .*rebuild the voice from its reference.wav"):
        loaded.check_codec(retrained)

    assert voice_for_codec(loaded, codec, audio) is loaded  # its own codec: the codes as saved
    again = voice_for_codec(loaded, retrained, audio)
    with torch.no_grad():
        expected = retrained.encode(torch.from_numpy(audio)[None])[0].numpy()
    np.testing.assert_array_equal(again.codes, expected)
    assert np.mean(again.codes[: len(loaded.codes)] == loaded.codes) < 0.5  # the same sound, other codes
    assert (again.codec_id, again.text, again.name) == (retrained.code_fingerprint(), "Hello there.", "alice")
    with pytest.raises(ValueError, match="another codec"):
        voice_for_codec(loaded, retrained, None)  # no recording to encode again
    saved_before = dataclasses.replace(loaded, codec_id=None)  # voice.json from before voices named codecs
    assert voice_for_codec(saved_before, retrained, None) is saved_before
    np.testing.assert_array_equal(voice_for_codec(saved_before, retrained, audio).codes, expected)

    # export ships a voice in the artifact codec's codes, its recording as saved; one without is left out.
    bare = tmp_path / "voices" / "bare"
    bare.mkdir()
    for file in ("voice.json", "codes.npy"):
        (bare / file).write_bytes((tmp_path / "voices" / "alice" / file).read_bytes())
    assert copy_voices(tmp_path / "voices", tmp_path / "shipped", retrained) == ["alice"]
    shipped = load_voice("alice", tmp_path / "shipped")
    recording = load_reference_audio("alice", tmp_path / "voices", codec.sample_rate)  # as 16-bit PCM
    with torch.no_grad():
        np.testing.assert_array_equal(shipped.codes, retrained.encode(torch.from_numpy(recording)[None])[0])
    assert shipped.codec_id == retrained.code_fingerprint()
    assert ((tmp_path / "shipped" / "alice" / "reference.wav").read_bytes()
            == (tmp_path / "voices" / "alice" / "reference.wav").read_bytes())
    assert copy_voices(tmp_path / "voices", tmp_path / "shipped-as-is", codec) == ["alice", "bare"]


# --- synth.py ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tok: SpeechTokenizer, random_lm: LlamaForCausalLM,
                codec: Codec) -> Path:
    """A SpeechLM save_pretrained folder (model + tokenizer) and a codec.pt as the codec stage writes it."""
    root = tmp_path_factory.mktemp("synth")
    random_lm.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    torch.save({"config": codec.config, "state_dict": codec.state_dict()}, root / "codec.pt")
    return root


def synth_overrides(root: Path, reference_wav: Path, **extra: str) -> list[str]:
    # A short guard keeps the decode to ~40 frames; top_k 10 keeps [speech_end] (logit 0, a median code's)
    # out of reach, so the length guard is what ends it.
    settings = {"text": "Hello, world: it's 5 o'clock.", "speechlm": root / "hf", "codec": root / "codec.pt",
                "sampling.top_k": 10, "voice": reference_wav, "voice_text": "The quick brown fox.",
                "voices_dir": root / "voices", "device": "cpu", "length.base_seconds": 0.1,
                "length.seconds_per_text_token": 0.02, **extra}
    return [f"{key}={value}" for key, value in settings.items()]


def test_synthesize_stream_equals_offline(checkpoints: Path, reference_wav: Path) -> None:
    def run(stream: str) -> synth.Synthesis:
        overrides = synth_overrides(checkpoints, reference_wav, stream=stream)
        return synth.synthesize(synth.compose_config(overrides))

    offline, streamed = run("false"), run("true")
    assert len(offline.codes) == offline.max_frames > 10 and offline.truncated
    assert torch.equal(streamed.codes, offline.codes)
    assert len(streamed.audio) == len(offline.audio) == len(offline.codes) * 160
    np.testing.assert_allclose(streamed.audio, offline.audio, atol=1e-5)
    assert streamed.first_audio_seconds is not None and offline.first_audio_seconds is None
    # Guidance is a setting of the same command: the same seed, other codes, streamed as offline.
    guided = [synth.synthesize(synth.compose_config(synth_overrides(
        checkpoints, reference_wav, stream=stream, **{"sampling.cfg_scale": "3.0"})))
        for stream in ("false", "true")]
    assert torch.equal(guided[0].codes, guided[1].codes) and not torch.equal(guided[0].codes, offline.codes)


def test_synthesize_errors(checkpoints: Path, reference_wav: Path, tmp_path: Path) -> None:
    def run(**extra: str) -> None:
        synth.synthesize(synth.compose_config(synth_overrides(checkpoints, reference_wav, **extra)))

    with pytest.raises(synth.SynthError, match="text is empty"):
        run(text="  ")
    with pytest.raises(FileNotFoundError, match="no SpeechLM at"):
        run(speechlm=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no codec at"):
        run(codec=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="no voice 'nobody'"):
        run(voice="nobody", voice_text="")
    with pytest.raises(synth.SynthError, match="pass voice_text"):
        run(voice_text="")


def test_synthesize_with_a_voice_codec_decodes_in_the_reference_voice(
        checkpoints: Path, reference_wav: Path, codec: Codec, tmp_path: Path) -> None:
    """A codec with a voice encoder decodes in the voice of the prompt's recording: streamed as offline,
    from the recording or from the voice saved with it; without a recording it says what to pass."""
    torch.manual_seed(1)
    voiced = Codec(**{**codec.config, "voice_dim": 8}).eval()
    torch.save({"config": voiced.config, "state_dict": voiced.state_dict()}, tmp_path / "voiced.pt")

    def run(**extra: str) -> synth.Synthesis:
        settings = {"codec": tmp_path / "voiced.pt", "voices_dir": tmp_path / "voices", **extra}
        return synth.synthesize(synth.compose_config(synth_overrides(checkpoints, reference_wav, **settings)))

    offline, streamed = run(stream="false", save_voice="ref"), run(stream="true")
    np.testing.assert_allclose(streamed.audio, offline.audio, atol=1e-5)
    saved = run(voice="ref", voice_text="")
    assert torch.equal(saved.codes, offline.codes)
    np.testing.assert_allclose(saved.audio, offline.audio, atol=3e-3)  # the wav keeps 16 bits of the clip
    expected = voiced.decode(offline.codes[None], voiced.voice(torch.from_numpy(
        synth.load_reference_audio("ref", tmp_path / "voices", voiced.sample_rate))[None]))[0].numpy()
    np.testing.assert_allclose(saved.audio, expected, atol=1e-5)
    (tmp_path / "voices" / "ref" / "reference.wav").unlink()
    with pytest.raises(ValueError, match="needs the voice's recording"):
        run(voice="ref", voice_text="")


def test_quote_free_text_keeps_sentences_verbatim() -> None:
    text = "It's 5:30, isn't it? [yes] {no} ${x} a\\b end\\"
    cfg = synth.compose_config([f"text={text}", "voice_text='already quoted, kept'"])
    assert cfg.text == text and cfg.voice_text == "already quoted, kept"


def test_synth_cli_writes_the_same_wav_streamed_or_not(checkpoints: Path, reference_wav: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """One real `python synth.py` process (streaming, saving the voice), then main's body in-process on the
    composed config (a second interpreter start would cost ~10 s on 2 busy cores) for the offline decode."""
    monkeypatch.chdir(tmp_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "synth.py"),
         *synth_overrides(checkpoints, reference_wav, stream="true", out="streamed.wav", save_voice="ref")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "saved voice 'ref'" in result.stdout and "real-time factor" in result.stdout
    assert "length guard: cut off" in result.stdout

    def main(*overrides: str) -> None:
        synth.main.__wrapped__(synth.compose_config(list(overrides)))  # what @hydra.main calls

    # The saved voice by name, offline decode: the same codes, so the same samples.
    main(*synth_overrides(checkpoints, reference_wav, stream="false", out="offline.wav", voice="ref",
                          voice_text=""))
    assert "wrote offline.wav" in capsys.readouterr().out
    streamed, rate = sf.read(tmp_path / "streamed.wav", dtype="int16")
    offline, _ = sf.read(tmp_path / "offline.wav", dtype="int16")
    assert rate == 16000 and len(streamed) > 0 and np.abs(streamed).max() > 0
    assert len(streamed) == len(offline)
    assert np.abs(streamed.astype(np.int32) - offline).max() <= 1  # 16-bit rounding of equal floats
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / "outputs").exists()  # no Hydra litter

    with pytest.raises(SystemExit) as exit_info:
        main("text=Hi.", f"speechlm={tmp_path}/none", f"codec={checkpoints / 'codec.pt'}")
    assert exit_info.value.code == 2
    assert "error: no SpeechLM at" in capsys.readouterr().err

"""The MAX port of the SpeechLM (voxlm.export.speechlm) against PyTorch: tiny preset, random weights.

Logits must agree at prefill (a left-padded batch) and over decode steps through the KV cache; greedy decoding
through the unchanged sampler (generate_codes) must give PyTorch's codes, 200 of them. The graph is compiled
once per process and shared by every model here (a cold compile takes 1-3 min on 2 cores, hence `slow`;
MAX's on-disk cache makes later runs take seconds).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from max.dtype import DType
from max.graph import DeviceRef
from omegaconf import OmegaConf
from transformers import DynamicCache, LlamaForCausalLM

from voxlm.export.kernels import CodeSamplerParams, sample_codes
from voxlm.export.parity import divergence_margins
from voxlm.export.sessions import compile_once
from voxlm.export.speechlm import (
    MASKED,
    LlamaShape,
    MaxKVCache,
    MaxSpeechLM,
    attention_bias,
    build_decode_graph,
    build_graph,
    weight_registry,
)
from voxlm.speechlm.generate import SamplingConfig, allowed_tokens, generate_codes, left_pad
from voxlm.speechlm.model import build_model
from voxlm.speechlm.sequences import tts_prompt
from voxlm.speechlm.tokenizer import SpeechTokenizer, train_text_tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK = 64
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine, they say.",
             "Is it raining in Paris? I don't think so.", "She sells sea shells by the sea shore."]
GREEDY = SamplingConfig(do_sample=False)
ATOL, RTOL = 1e-3, 1e-4  # max-abs, and max-abs over the largest |logit|


@pytest.fixture(scope="module")
def tok() -> SpeechTokenizer:
    return SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK)


def tiny_lm(tok: SpeechTokenizer, tied: bool, seed: int) -> LlamaForCausalLM:
    """The tiny preset (GQA 4/2 heads) with a padded vocabulary and weights sharper than its init, so that
    argmax ties cannot hide a wrong path; [speech_end]'s output row is zeroed (logit 0, below the best code's
    in practice), so greedy rows run to their length limit. Tied or not, the shape is the same: one graph."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "speechlm" / "tiny.yaml").model)
    cfg.update(tie_word_embeddings=tied, pad_vocab_to_multiple_of=128, initializer_range=0.2)
    torch.manual_seed(seed)
    model = build_model(cfg, len(tok), tok.layout.special_ids).eval()
    if not tied:
        with torch.no_grad():
            model.lm_head.weight[tok.speech_end_id] = 0
    return model


@pytest.fixture(scope="module")
def torch_lm(tok: SpeechTokenizer) -> LlamaForCausalLM:
    return tiny_lm(tok, tied=False, seed=0)


@pytest.fixture(scope="module")
def max_lm(torch_lm: LlamaForCausalLM) -> MaxSpeechLM:
    return MaxSpeechLM.from_pretrained(torch_lm)


def prompts(tok: SpeechTokenizer) -> list[np.ndarray]:
    """Two prompts of different lengths (with and without a voice prompt): the shorter one is left-padded."""
    rng = np.random.default_rng(0)
    return [tts_prompt(tok, "Hello there.", "She sells sea shells.", rng.integers(0, CODEBOOK, 9)),
            tts_prompt(tok, "Is it raining in Paris?")]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    error = float((got - want).abs().max())
    assert error <= ATOL and error / float(want.abs().max()) <= RTOL, error


def test_logits_match_at_prefill_and_decode(tok: SpeechTokenizer, torch_lm: LlamaForCausalLM,
                                            max_lm: MaxSpeechLM) -> None:
    ids, mask = left_pad(prompts(tok), tok.pad_id)
    assert (mask == 0).any()  # the batch really is padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  logits_to_keep=1)
    with torch.no_grad():
        want = torch_lm(**kwargs, cache=DynamicCache(config=torch_lm.config))
    got = max_lm(**kwargs, cache=DynamicCache(config=torch_lm.config))
    assert got.logits.shape == want.logits.shape and got.logits.dtype == torch.float32
    assert_close(got.logits, want.logits)
    assert isinstance(got.cache, MaxKVCache) and got.cache.get_seq_length() == ids.shape[1]

    # Decode steps feed both models the same tokens (PyTorch's argmax); row 1 stops after step 3 and is fed
    # padding that nothing attends to, as the sampler does.
    next_position = mask.sum(1)
    for step in range(8):
        token = want.logits[:, -1].argmax(-1)
        active = torch.tensor([True, step < 3])
        mask = torch.cat([mask, active[:, None].long()], dim=1)
        kwargs = dict(input_ids=torch.where(active, token, tok.pad_id)[:, None], attention_mask=mask,
                      position_ids=next_position[:, None], use_cache=True, logits_to_keep=1)
        with torch.no_grad():
            want = torch_lm(**kwargs, cache=want.cache)
        got = max_lm(**kwargs, cache=got.cache)
        assert_close(got.logits[active], want.logits[active])
        next_position = next_position + active.long()
    assert got.cache.get_seq_length() == mask.shape[1]


def argmax_codes(model: LlamaForCausalLM | MaxSpeechLM, tok: SpeechTokenizer, rows: list[np.ndarray],
                 steps: int) -> list[list[int]]:
    """A raw greedy loop over the KV cache that may only pick codes (no [speech_end]): `steps` per row."""
    ids, mask = left_pad(rows, tok.pad_id)
    allowed = allowed_tokens(tok, model.config.vocab_size)
    allowed[tok.speech_end_id] = False
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    position, tokens = mask.sum(1), []
    for _ in range(steps):
        token = out.logits[:, -1].masked_fill(~allowed, -math.inf).argmax(-1)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                    cache=out.cache, use_cache=True, logits_to_keep=1)
        position = position + 1
    return torch.stack(tokens, dim=1).tolist()


def test_greedy_decoding_matches_pytorch(tok: SpeechTokenizer, torch_lm: LlamaForCausalLM,
                                         max_lm: MaxSpeechLM) -> None:
    rows = prompts(tok)
    with torch.no_grad():
        want = generate_codes(torch_lm, tok, rows, max_frames=200, sampling=GREEDY)
    got = generate_codes(max_lm, tok, rows, max_frames=200, sampling=GREEDY)
    assert [len(c) for c in want.codes] == [200, 200] and want.truncated == [True, True]
    assert len(set(want.codes[0].tolist())) > 10  # a real path, not one code repeated
    assert [c.tolist() for c in got.codes] == [c.tolist() for c in want.codes]
    assert got.truncated == want.truncated

    with torch.no_grad():
        want_raw = argmax_codes(torch_lm, tok, rows, 200)
    assert argmax_codes(max_lm, tok, rows, 200) == want_raw


def test_the_graph_samples_as_the_sampler_kernel_does(tok: SpeechTokenizer, max_lm: MaxSpeechLM) -> None:
    """`sample_step` (the CPU graphs sample in the same call, prefill and decode) draws the tokens the Mojo
    sampler draws alone from the same logits, and a -inf logit bias keeps a row off a token."""
    ids, mask = left_pad(prompts(tok), tok.pad_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    params = CodeSamplerParams(offset=tok.code_offset, num_codes=CODEBOOK, speech_end=tok.speech_end_id,
                               temperature=0.9, top_k=20, top_p=0.9, penalty=1.3)
    recent = torch.tensor([[tok.code_offset + 3, -1], [tok.code_offset + 5, tok.code_offset + 3]])
    no_bias = torch.zeros(2, max_lm.shape.vocab_size)
    generator = torch.Generator().manual_seed(0)
    cache, logits_cache = None, None
    for step in range(6):
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        logits = max_lm(ids, mask, positions, logits_cache)
        tokens, cache = max_lm.sample_step(ids, mask, positions, cache, no_bias, recent, u, params)
        assert tokens.tolist() == sample_codes(logits.logits[:, -1], recent, u, params).tolist(), step
        logits_cache = logits.cache
        ids, positions = tokens[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

    greedy = CodeSamplerParams(offset=tok.code_offset, num_codes=CODEBOOK, speech_end=tok.speech_end_id,
                               temperature=0.0)
    first, _ = max_lm.sample_step(ids, mask, positions, cache, no_bias, recent, u, greedy)
    bias = no_bias.clone()
    bias[1, first[1]] = -math.inf
    cache.crop(cache.length)  # the same step again, from the same past
    second, _ = max_lm.sample_step(ids, mask, positions, cache, bias, recent, u, greedy)
    assert second[0] == first[0] and second[1] != first[1]


def test_rows_move_within_the_cache_as_a_copy_would_hold_them(tok: SpeechTokenizer,
                                                             max_lm: MaxSpeechLM) -> None:
    """The server's in-place row moves (a leaver's gap filled by the last row, a joiner written into a
    spare row, left-padded) leave the cache a fresh copy of the same rows would be: same tensors, and the
    decode step over it gives the same logits."""
    rng = np.random.default_rng(1)
    rows = [tts_prompt(tok, text, "Hello there.", rng.integers(0, CODEBOOK, 5 + 3 * i))
            for i, text in enumerate(SENTENCES)]
    ids, mask = left_pad(rows, tok.pad_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = max_lm(ids, mask, positions)
    token = out.logits[:, -1].argmax(-1)[:, None]
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    out = max_lm(token, mask, positions[:, -1:] + 1, out.cache)  # an in-place cache from here on
    cache = max_lm.cache_from_tensors(max_lm.cache_tensors(out.cache), spare_rows=1)
    before = [t.clone() for t in max_lm.cache_tensors(cache)]

    # Row 1 leaves: row 3 takes its place.
    with pytest.raises(ValueError, match="past the new end"):
        max_lm.keep_rows(cache, [1, 0, 2])
    order = [0, 3, 2]
    cache = max_lm.keep_rows(cache, order)
    for got, was in zip(max_lm.cache_tensors(cache), before, strict=True):
        assert torch.equal(got, was[order])

    # A newcomer with a shorter past joins in a spare row; one with a longer past cannot.
    short, _ = left_pad([tts_prompt(tok, "Hi.")], tok.pad_id)
    joiner = max_lm(short, torch.ones_like(short), torch.arange(short.shape[1])[None]).cache
    assert max_lm.append_rows(joiner, cache, [0]) is None
    cache = max_lm.append_rows(cache, joiner, [0])
    assert cache.layers[0].shape[0] == 4
    pad = cache.length - joiner.length
    for got, was, new in zip(max_lm.cache_tensors(cache), before, max_lm.cache_tensors(joiner), strict=True):
        assert torch.equal(got[:3], was[order])
        assert torch.equal(got[3, :, :pad], torch.zeros_like(got[3, :, :pad]))
        assert torch.equal(got[3:, :, pad:], new)
    full = max_lm.cache_tensors(cache)
    spare = max_lm.append_rows(cache, joiner, [0])  # the leaver's row was taken: one of 5 is left
    assert spare.layers[0].shape[0] == 5 and max_lm.append_rows(spare, joiner, [0]) is None

    # The next step over the moved rows and over a fresh copy of them.
    index = torch.tensor(order)
    joiner_mask = torch.cat([torch.zeros(1, pad, dtype=torch.long),
                             torch.ones(1, joiner.length, dtype=torch.long)], 1)
    step_mask = torch.cat([torch.cat([mask[index], joiner_mask]), torch.ones(4, 1, dtype=torch.long)], dim=1)
    step_ids = torch.cat([token[index], torch.tensor([[tok.code_offset]])])
    step_positions = torch.cat([positions[index, -1:] + 2, torch.tensor([[joiner.length]])])
    moved = max_lm(step_ids, step_mask, step_positions, cache).logits
    copy = max_lm.cache_from_tensors([t.clone() for t in full])
    fresh = max_lm(step_ids, step_mask, step_positions, copy).logits
    assert torch.equal(moved, fresh)


def test_from_save_pretrained_folder_with_tied_embeddings(tok: SpeechTokenizer, tmp_path: Path) -> None:
    """A tied model through its save_pretrained folder (which holds no lm_head.weight)."""
    torch_lm = tiny_lm(tok, tied=True, seed=1)
    torch_lm.save_pretrained(tmp_path)
    max_lm = MaxSpeechLM.from_pretrained(tmp_path)
    ids, mask = left_pad(prompts(tok), tok.pad_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                  use_cache=True, logits_to_keep=1)
    with torch.no_grad():
        want = torch_lm(**kwargs, cache=DynamicCache(config=torch_lm.config))
    assert_close(max_lm(**kwargs).logits, want.logits)


@pytest.mark.parametrize("tied", [False, True])
def test_the_gpu_graph_computes_the_same_logits_on_the_cpu(tok: SpeechTokenizer, tied: bool) -> None:
    """The GPU's graph (past K/V passed in and handed back as past + new, RoPE by slices) compiled for the
    CPU: its logits match PyTorch at prefill and over decode steps, so a disagreement on a GPU is the
    device's kernels, not the graph. Tied too (the lm_head bound to the embedding)."""
    torch_lm = tiny_lm(tok, tied=tied, seed=2)
    shape = LlamaShape.from_config(torch_lm.config)
    session, compiled = compile_once(
        ("speechlm_with_past", shape), "cpu",
        lambda: build_graph(shape, DType.float32, DeviceRef.CPU(), with_past=True, rope_by_slices=True))
    weights = weight_registry(torch_lm.state_dict(), shape, "float32", tied)
    graph = session.init(compiled, weights_registry=weights)

    ids, mask = left_pad(prompts(tok), tok.pad_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    past = [torch.zeros(len(ids), shape.num_kv_heads, 0, shape.head_dim)] * (2 * shape.num_layers)
    cache = DynamicCache(config=torch_lm.config)
    for _ in range(4):
        with torch.no_grad():
            want = torch_lm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1)
        logits, *past = graph.execute(ids, attention_bias(mask, ids.shape[1]), positions,
                                      *[p.contiguous() for p in past])
        past = [torch.from_dlpack(p) for p in past]
        assert_close(torch.from_dlpack(logits), want.logits[:, -1])
        assert past[0].shape[2] == mask.shape[1]
        cache, ids = want.cache, want.logits[:, -1].argmax(-1, keepdim=True)
        positions = mask.sum(1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)


@pytest.mark.parametrize("dtype", [DType.float32, DType.bfloat16])
def test_every_speechlm_graph_builds_in_each_dtype(tok: SpeechTokenizer, dtype: DType) -> None:
    """Building (not compiling: that is seconds, not minutes) each graph an export can ask for: the CPU's
    prefill and decode graphs and the GPU's graph, in float32 and bfloat16. A bfloat16 constant made from a
    float32 array broke the CPU's bf16 export once, unseen, since only float32 is compiled in the tests."""
    shape = LlamaShape.from_config(tiny_lm(tok, tied=False, seed=0).config)
    graphs = [build_graph(shape, dtype, DeviceRef.CPU(), with_past=False), build_decode_graph(shape, dtype),
              build_graph(shape, dtype, DeviceRef.GPU(), with_past=True)]
    assert len({graph.name for graph in graphs}) == 3


def test_greedy_rows_may_part_from_pytorch_only_at_a_near_tie() -> None:
    """The gate's greedy rule (voxlm.export.parity.divergence_margins): where a row first parts from
    PyTorch's, the margin is PyTorch's logit of its token minus that of the exported one, at that step."""
    reference_logits = torch.zeros(3, 4, 6)
    reference_logits[:, :, 1] = 5.0                  # PyTorch's pick: token 1 at every step
    reference_logits[1, 2, 3] = 4.9                  # row 1, step 2: token 3 a near tie (0.1 below)
    reference_logits[2, 1, 4] = 2.0                  # row 2, step 1: token 4 is 3.0 below
    reference = torch.ones(3, 4, dtype=torch.long)
    exported = reference.clone()
    exported[1, 2:] = torch.tensor([3, 0])           # parts at step 2 (later steps follow its own path)
    exported[2, 1:] = 4
    margins = divergence_margins(reference_logits, reference, exported)
    assert margins[0] == (None, 0.0)
    assert margins[1][0] == 2 and margins[1][1] == pytest.approx(0.1)
    assert margins[2] == (1, 3.0)


def test_attention_bias_hides_left_padding_and_the_future() -> None:
    """The host-made bias (voxlm.export.speechlm.attention_bias) for 3 new tokens after a past of 2: a key is
    hidden where it is left padding (row 0's first key) or after the query (within the new tokens)."""
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    bias = attention_bias(mask, new_tokens=3)
    assert bias.shape == (2, 1, 1, 3, 5) and bias.dtype == np.float32
    visible = np.array([[1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 0],
                        [1, 1, 1, 1, 1]], dtype=bool)
    hidden = ~(visible[None] & mask.numpy()[:, None].astype(bool))       # [B, T, P+T]
    assert np.array_equal(bias[:, 0, 0] != 0, hidden)
    assert set(np.unique(bias)) == {0.0, np.float32(MASKED)}


def test_prefill_is_causal(tok: SpeechTokenizer, torch_lm: LlamaForCausalLM, max_lm: MaxSpeechLM) -> None:
    """A position's K/V in every layer must not change when later tokens join the prompt (the logits checks
    read the last position only; an attention that saw the future would change the earlier ones), and
    they match transformers' own. MAX once fused an in-graph causal mask away (docs/benchmarks.md)."""
    ids = torch.from_numpy(prompts(tok)[0])[None]
    full, cut = ids.shape[1], ids.shape[1] - 5

    def kv(model: LlamaForCausalLM | MaxSpeechLM, n: int) -> list[torch.Tensor]:
        kwargs = dict(input_ids=ids[:, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                      position_ids=torch.arange(n)[None], use_cache=True, logits_to_keep=1)
        if model is max_lm:
            return max_lm.cache_tensors(max_lm(**kwargs, cache=None).cache)
        with torch.no_grad():
            cache = model(**kwargs, cache=DynamicCache(config=model.config)).cache
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]

    short, long, reference = kv(max_lm, cut), kv(max_lm, full), kv(torch_lm, full)
    for s, lo, ref in zip(short, long, reference, strict=True):
        assert torch.equal(s, lo[:, :, :cut])
        assert float((lo - ref).abs().max()) <= ATOL


def test_the_op_check_builds_its_inputs_and_finds_a_wrong_row() -> None:
    """scripts/check_max_ops.py (the GPU visit's op check; compiling its graph takes minutes, so it runs on
    the device): its inputs and float64 references build against this module's functions, one reference per
    case, and its error measure names the first row that is off by its own size."""
    check = load_script("check_max_ops")
    tensors = check.inputs_for(9, torch.Generator().manual_seed(0))
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    references = check.references(tensors)
    assert len(references) == len(check.case_names())
    want = references[check.case_names().index("float32 attention block [2,M,256]")]
    assert check.error(want.float(), want, check.BOUND["float32"])[1] is None
    wrong = want.clone()
    wrong[:, 5] += want.abs().max()
    assert check.error(wrong, want, check.BOUND["float32"])[1] == 5


def test_the_gpu_float32_emulation_rounds_as_the_h200_measured() -> None:
    """scripts/emulate_gpu_float32.py, which set the float32 GPU thresholds: its rounding keeps 10 mantissa
    bits (truncated), reproduces the H200's measured float32 matmul errors within 25%, and its model copy
    rounds only layers of 2 rows or more, leaving the original untouched."""
    emulate = load_script("emulate_gpu_float32")
    x = torch.tensor([1 + 2.0 ** -10, 1 + 2.0 ** -11 + 2.0 ** -12, -3.0])
    assert emulate.truncate_to_tf32(x).tolist() == [1 + 2.0 ** -10, 1.0, -3.0]
    generator = torch.Generator().manual_seed(0)
    for (k, n), measured in emulate.H200_MATMUL_ERRORS.items():
        assert emulate.matmul_error(k, n, generator) == pytest.approx(measured, rel=0.25)
    layer = torch.nn.Linear(64, 8, bias=False)
    rounded = emulate.with_gpu_matmul_rounding(torch.nn.Sequential(layer))
    one, two = torch.randn(1, 64), torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(rounded(one), layer(one))
        assert not torch.equal(rounded(two), layer(two))
        assert torch.allclose(rounded(two), layer(two), rtol=0, atol=1e-2)
        assert torch.equal(layer.weight, rounded[0].weight)

"""SpeechLM building blocks: the vocabulary layout (text, specials, one contiguous code block), the model
presets and init from a pretrained LLM, and the token sequences (loss masks, packing, mixture, SFT
prompts)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from voxlm.codec.model import FSQ
from voxlm.data.phonemes import (
    phoneme_inventory,
    phoneme_starts,
    phoneme_symbols,
    spoken_phonemes,
    word_phonemes,
)
from voxlm.data.shards import CodeShards, ShardWriter
from voxlm.speechlm.alignment import (
    TextSpeechSpan,
    diagonal_band,
    guided_attention_loss,
    text_speech_spans,
)
from voxlm.speechlm.code_grid import add_code_grid, fold_code_grid, has_code_grid
from voxlm.speechlm.grid_smoothing import grid_smoothed_loss, grid_targets
from voxlm.speechlm.model import build_model, count_parameters, llama_config, padded_vocab_size
from voxlm.speechlm.module import SpeechLMModule, hf_config_dict, noisy_codes
from voxlm.speechlm.sequences import (
    IGNORE,
    SOURCES,
    MixtureSampler,
    PretrainDataset,
    SFTDataset,
    continuation_example,
    generation_start,
    interleaved_speech,
    pack,
    pad_collate,
    phrase_example,
    text_example,
    tts_prompt,
    tts_sequence,
)
from voxlm.speechlm.stage import with_recipe
from voxlm.speechlm.tokenizer import (
    LAYOUT_FILE,
    SpeechTokenizer,
    load_text_tokenizer,
    train_text_tokenizer,
)

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "speechlm"
CODEBOOK = 64
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine, they say.",
    "Never put off until tomorrow what you can do today!",
    "Is it raining in Paris? I don't think so.",
    "She sells sea shells by the sea shore.",
    "Twenty one people met at the old mill at half past seven.",
]


def preset(name: str):
    """A speechlm preset resolved beside its codec preset (the paths it interpolates point into a dummy
    folder)."""
    speechlm = OmegaConf.load(CONFIGS / f"{name}.yaml")
    codec = OmegaConf.load(CONFIGS.parent / "codec" / f"{name}.yaml")
    return OmegaConf.create({"paths": {"data_dir": "/nonexistent"}, "speechlm": speechlm,
                             "codec": codec}).speechlm


@pytest.fixture(scope="module")
def tok() -> SpeechTokenizer:
    return SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK)


@pytest.fixture()
def shards(tmp_path: Path) -> CodeShards:
    """3 speakers with 4 utterances each, and one speaker with a single utterance (no prompt possible)."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path / "train")
    speakers = [f"spk{s}" for s in range(3) for _ in range(4)] + ["lonely"]
    for i, speaker in enumerate(speakers):
        n = int(rng.integers(5, 60))
        text = SENTENCES[i % len(SENTENCES)]
        writer.add(f"utt{i:02d}", rng.integers(0, CODEBOOK, n), text, speaker, duration=n / 100)
    writer.close({"codebook_size": CODEBOOK, "frame_rate": 100.0, "sample_rate": 16000})
    return CodeShards(tmp_path / "train")


# --- tokenizer ---------------------------------------------------------------------------------------------

def test_code_token_round_trip_over_all_codes(tok: SpeechTokenizer) -> None:
    codes = np.arange(CODEBOOK, dtype=np.int32)
    tokens = tok.code_to_token(codes)
    assert tokens.dtype == np.int64 and tokens[0] == tok.code_offset
    np.testing.assert_array_equal(tok.token_to_code(tokens), codes)
    tensor_tokens = tok.code_to_token(torch.from_numpy(codes).view(8, 8))
    assert tensor_tokens.shape == (8, 8)
    assert torch.equal(tok.token_to_code(tensor_tokens), torch.arange(CODEBOOK).view(8, 8))
    assert tok.token_to_code(tok.code_to_token(CODEBOOK - 1)) == CODEBOOK - 1
    # The token strings agree with the arithmetic.
    assert tok.tokenizer.convert_ids_to_tokens(tokens.tolist()) == [f"<|c_{c}|>" for c in range(CODEBOOK)]
    everything = np.arange(len(tok))
    np.testing.assert_array_equal(everything[tok.is_code(everything)], tokens)
    with pytest.raises(ValueError, match="codes must lie in"):
        tok.code_to_token(np.array([0, CODEBOOK]))
    with pytest.raises(ValueError, match="code token ids must lie in"):
        tok.token_to_code(np.array([tok.speech_end_id]))


def test_code_block_is_contiguous_and_after_every_other_token(tok: SpeechTokenizer) -> None:
    vocab = tok.tokenizer.get_vocab()
    assert len(vocab) == len(tok) == tok.code_offset + CODEBOOK
    others = [i for token, i in vocab.items() if not token.startswith("<|c_")]
    assert len(others) == tok.code_offset and max(others) == tok.code_offset - 1
    code_ids = sorted(i for token, i in vocab.items() if token.startswith("<|c_"))
    assert code_ids == list(range(tok.code_offset, tok.code_offset + CODEBOOK))
    specials = tok.layout.special_ids
    assert len(set(specials.values())) == len(specials) == 10
    # Text first, then specials: a trained BPE brings none, so every special is new and above the text.
    assert min(specials.values()) >= tok.layout.text_vocab_size


def test_text_round_trip_and_no_injection(tok: SpeechTokenizer) -> None:
    for text in [*SENTENCES, "  odd   spacing, tabs\tand émojis 🙂 ", "<|c_3|> is not a code here"]:
        ids = tok.encode_text(text)
        assert tok.decode_text(ids) == text
        assert ids and max(ids) < tok.layout.text_vocab_size, "text must never encode to specials or codes"
    # Decoding a whole sequence keeps only its text.
    example = tts_sequence(tok, "Hello there.", np.arange(5))
    assert tok.decode_text(example.input_ids) == "Hello there."


def test_save_load_round_trip(tok: SpeechTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "tok")
    loaded = SpeechTokenizer.from_pretrained(tmp_path / "tok", codebook_size=CODEBOOK)
    assert loaded.layout == tok.layout and len(loaded) == len(tok)
    for text in SENTENCES:
        assert loaded.encode_text(text) == tok.encode_text(text)
    assert loaded.speech_end_id == tok.speech_end_id and loaded.pad_id == tok.pad_id
    codes = np.arange(CODEBOOK)
    np.testing.assert_array_equal(loaded.code_to_token(codes), tok.code_to_token(codes))


def test_load_refuses_mismatched_layouts(tok: SpeechTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=f"built for a {CODEBOOK}-code codec, but this codec has 1000"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok", codebook_size=1000)
    layout = json.loads((tmp_path / "tok" / LAYOUT_FILE).read_text())
    (tmp_path / "tok" / LAYOUT_FILE).write_text(json.dumps({**layout, "codebook_size": CODEBOOK + 1}))
    with pytest.raises(ValueError, match="does not match its vocabulary layout"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / LAYOUT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a SpeechLM tokenizer"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")


def test_layouts_saved_before_advance_existed_still_load(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints and artifacts saved before <|advance|> was reserved are plain-format tokenizers."""
    import voxlm.speechlm.tokenizer as tokenizer_module

    older = {k: v for k, v in tokenizer_module.CONTROL_TOKENS.items() if k != "advance"}
    monkeypatch.setattr(tokenizer_module, "CONTROL_TOKENS", older)
    SpeechTokenizer.build(train_text_tokenizer(SENTENCES, vocab_size=280), CODEBOOK).save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = SpeechTokenizer.from_pretrained(tmp_path)
    assert loaded.advance_id is None and not loaded.interleaved
    assert json.loads((tmp_path / LAYOUT_FILE).read_text())["special_ids"].keys() == {"bos", "eos", "pad",
                                                                                     *older}


def test_pretrained_tokenizer_keeps_its_bos_eos(tmp_path: Path) -> None:
    """A Llama-3-like folder: its own bos/eos are reused, pad and the control tokens are added after."""
    text = train_text_tokenizer(SENTENCES, vocab_size=280)
    text.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    text.save_pretrained(tmp_path / "llm")
    loaded = load_text_tokenizer(tmp_path / "llm")
    n_text = len(loaded)
    tok = SpeechTokenizer.build(loaded, 16)
    assert tok.layout.text_vocab_size == n_text
    assert tok.bos_id < n_text and tok.eos_id < n_text and tok.pad_id >= n_text
    assert tok.code_offset == n_text + 8  # pad + 7 control tokens


# --- model -------------------------------------------------------------------------------------------------

def test_tiny_preset_builds_and_trains(tok: SpeechTokenizer) -> None:
    cfg = preset("tiny")
    model = build_model(cfg.model, len(tok), tok.layout.special_ids)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_id
    assert model.config.hidden_size == cfg.model.hidden_size and model.config.num_key_value_heads == 2
    example = tts_sequence(tok, SENTENCES[0], np.arange(20) % CODEBOOK)
    ids = torch.from_numpy(example.input_ids)[None]
    loss = model(input_ids=ids, labels=torch.from_numpy(example.labels)[None]).loss
    # Untrained and small-initialized: close to a uniform guess over the vocabulary.
    assert abs(loss.item() - np.log(len(tok))) < 0.5
    loss.backward()
    assert model.get_input_embeddings().weight.grad[tok.code_offset:].abs().sum() > 0


def test_base_preset_is_llama_3_2_1b_shaped() -> None:
    cfg = preset("base")
    config = llama_config(cfg.model, 128256)  # Llama 3's own vocabulary, before speech tokens
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert count_parameters(model) == 1_235_814_400  # Llama-3.2-1B's parameter count
    assert config.rope_parameters["rope_theta"] == 500000.0 and config.tie_word_embeddings
    assert config.vocab_size == 128256  # already a multiple of 64
    assert padded_vocab_size(128256 + 7 + 65536, cfg.model.pad_vocab_to_multiple_of) == 193856
    assert cfg.tokenizer.path == cfg.model.init_from == "/nonexistent/models/Llama-3.2-1B"
    quick = preset("quickstart")
    assert 256 <= quick.model.hidden_size <= 384 and 4 <= quick.model.num_hidden_layers <= 6
    for name in ("tiny", "quickstart", "base"):
        p = preset(name)
        assert set(p.pretrain.mixture) == set(SOURCES)
        assert {"pretrain", "sft", "lora", "model", "tokenizer"} <= set(p)


def test_recipe_precision_auto_takes_bf16_where_the_cpu_has_it() -> None:
    trainer = {"accelerator": "cpu", "precision": "32-true", "val_check_interval": 5}
    cfg = OmegaConf.create({"trainer": trainer})
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    recipe = OmegaConf.create({"accumulate_grad_batches": 2, "precision": "auto"})
    merged = with_recipe(cfg, recipe)
    assert merged.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert merged.trainer.val_check_interval == 10 and cfg.trainer.precision == "32-true"  # a copy
    assert with_recipe(cfg, OmegaConf.create({"accumulate_grad_batches": 1, "precision": None})
                       ).trainer.precision == "32-true"  # null: the trainer's own
    gpu = OmegaConf.merge(cfg, {"trainer": {"accelerator": "gpu"}})
    assert with_recipe(gpu, recipe).trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("tied", [False, True])
def test_init_from_pretrained_llm_grows_embeddings_with_their_mean(tmp_path: Path, tied: bool) -> None:
    cfg = {**OmegaConf.to_container(preset("tiny").model), "tie_word_embeddings": tied}
    old_vocab = 300
    llm = build_model(cfg, old_vocab)
    llm.save_pretrained(tmp_path / "llm")
    grown = build_model({**cfg, "init_from": str(tmp_path / "llm"), "pad_vocab_to_multiple_of": 64}, 350)
    assert grown.config.vocab_size == 384  # 350 rounded up to 64
    old_in, new_in = llm.get_input_embeddings().weight, grown.get_input_embeddings().weight
    assert torch.equal(new_in[:old_vocab], old_in)
    torch.testing.assert_close(new_in[old_vocab:], old_in.mean(0).expand(384 - old_vocab, -1))
    old_out, new_out = llm.get_output_embeddings().weight, grown.get_output_embeddings().weight
    torch.testing.assert_close(new_out[old_vocab:], old_out.mean(0).expand(384 - old_vocab, -1))
    # The old tokens' predictions are untouched: the new rows only add columns.
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits[..., :old_vocab], llm(ids).logits)
    with pytest.raises(ValueError, match="does not have the preset's shape"):
        build_model({**cfg, "init_from": str(tmp_path / "llm"), "num_hidden_layers": 3}, 350)


def test_code_grid_shares_each_fsq_digit_and_folds_into_a_stock_model(tok: SpeechTokenizer,
                                                                       tmp_path: Path) -> None:
    levels = [4, 4, 4]  # the tiny codec's: 64 codes
    model = build_model(preset("tiny").model, len(tok), tok.layout.special_ids)
    example = tts_sequence(tok, SENTENCES[0], np.arange(40) % CODEBOOK)
    ids, labels = torch.from_numpy(example.input_ids)[None], torch.from_numpy(example.labels)[None]
    with torch.no_grad():
        plain = model(ids).logits
    grid = add_code_grid(model, levels, tok.code_offset, CODEBOOK, init_std=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain)  # zero tables: the model's outputs unchanged
    # Two codes share a table row exactly where the codec's FSQ gives them the same latent value.
    latent = FSQ(levels).codes_to_latent(torch.arange(CODEBOOK))
    same_row = grid.table_rows[:, None, :] == grid.table_rows[None, :, :]
    assert torch.equal(same_row, latent[:, None, :] == latent[None, :, :])
    assert grid.table.shape == (sum(levels), model.config.hidden_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    assert grid.table.abs().sum() > 0  # the tables trained, from the frames of every code
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    torch.testing.assert_close(embed.weight, head.weight)  # still tied through the shared grid
    with torch.no_grad():
        trained = model(ids).logits
    fold_code_grid(model)
    assert not has_code_grid(model) and head.weight is embed.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "hf")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert "model.embed_tokens.weight" in reloaded.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained, rtol=0, atol=1e-5)


def test_code_noise_replaces_only_codes_by_random_codes(tok: SpeechTokenizer) -> None:
    example = tts_sequence(tok, SENTENCES[0], np.arange(2000) % CODEBOOK)
    ids = torch.from_numpy(example.input_ids)[None]
    is_code = (ids >= tok.code_offset) & (ids < tok.code_offset + CODEBOOK)
    torch.manual_seed(0)
    noisy = noisy_codes(ids, tok.code_offset, CODEBOOK, 0.3)
    assert torch.equal(noisy[~is_code], ids[~is_code])  # text and control tokens stay
    assert ((noisy >= tok.code_offset) & (noisy < tok.code_offset + CODEBOOK)).equal(is_code)
    changed = float((noisy != ids)[is_code].float().mean())
    assert 0.3 * (1 - 1 / CODEBOOK) - 0.03 < changed < 0.3 + 0.03  # a drawn code may be the same one
    assert torch.equal(noisy_codes(ids, tok.code_offset, CODEBOOK, 0.0), ids)
    assert len(noisy[is_code].unique()) == CODEBOOK  # drawn from the whole block


def test_code_grid_refuses_levels_of_another_codec_and_untied_embeddings(tok: SpeechTokenizer) -> None:
    model = build_model(preset("tiny").model, len(tok), tok.layout.special_ids)
    with pytest.raises(ValueError, match=r"make 1000 codes but the vocabulary holds 64.*codec.model.levels"):
        add_code_grid(model, [8, 5, 5, 5], tok.code_offset, CODEBOOK, init_std=0.01)
    untied = build_model({**OmegaConf.to_container(preset("tiny").model), "tie_word_embeddings": False},
                         len(tok), tok.layout.special_ids)
    with pytest.raises(ValueError, match="tie_word_embeddings=true"):
        add_code_grid(untied, [4, 4, 4], tok.code_offset, CODEBOOK, init_std=0.01)



def test_grid_smoothing_makes_a_near_code_cheaper_than_a_far_one(tok: SpeechTokenizer) -> None:
    """A code label's target shares its mass with its FSQ-grid neighbours: predicting a neighbour of the
    label costs less than predicting a far code (with one-hot targets both cost the same); text labels keep
    one-hot targets; weight 0 is transformers' own next-token loss."""
    levels, fsq = [4, 4, 4], FSQ([4, 4, 4])
    targets = grid_targets(levels, sigma=0.25)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(CODEBOOK))
    assert torch.equal(targets.argmax(dim=1), torch.arange(CODEBOOK))
    code = int(fsq.latent_to_codes(torch.tensor([0.0, 0.0, 0.0])))  # digits (2, 2, 2)
    near = int(fsq.latent_to_codes(torch.tensor([1.0, 0.0, 0.0])))
    far = int(fsq.latent_to_codes(torch.tensor([-2.0, -2.0, 1.0])))
    assert targets[code, near] > 0.05 and targets[code, far] < 1e-6

    def loss(label: int, predicted: int, weight: float) -> float:
        logits = torch.zeros(1, 2, len(tok))
        logits[0, 0, predicted] = 8.0
        labels = torch.tensor([[IGNORE, label]])
        return float(grid_smoothed_loss(logits, labels, targets, tok.code_offset, weight))

    offset = tok.code_offset
    assert loss(offset + code, offset + near, 0.0) == pytest.approx(loss(offset + code, offset + far, 0.0))
    assert loss(offset + code, offset + near, 0.5) < loss(offset + code, offset + far, 0.5) - 0.1
    text_id = tok.encode_text("fox")[0]
    assert loss(text_id, offset + near, 0.5) == pytest.approx(loss(text_id, offset + near, 0.0))
    with pytest.raises(ValueError, match="sigma=0.0: it must be > 0"):
        grid_targets(levels, sigma=0.0)

    model = build_model(preset("tiny").model, len(tok), tok.layout.special_ids)
    ids = torch.from_numpy(tts_sequence(tok, SENTENCES[0], np.arange(300) % CODEBOOK).input_ids)[None]
    labels = torch.from_numpy(tts_sequence(tok, SENTENCES[0], np.arange(300) % CODEBOOK).labels)[None]
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(grid_smoothed_loss(out.logits, labels, targets, offset, 0.0), out.loss)
    optim = dict(preset("tiny").sft.optim)
    with pytest.raises(ValueError, match=r"\[8, 5, 5, 5\] make 1000 codes but the vocabulary holds 64"):
        SpeechLMModule(hf_config_dict(model), optim, 10, layout=asdict(tok.layout), model=model,
                       grid_smoothing={"weight": 0.5, "sigma": 0.25, "levels": [8, 5, 5, 5]})
    # The training module takes the smoothed loss as its training loss, and steps on it lower it.
    module = SpeechLMModule(hf_config_dict(model), optim, 10, layout=asdict(tok.layout), model=model,
                            grid_smoothing={"weight": 0.5, "sigma": 0.25, "levels": levels})
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    first, guided = module.training_losses(batch)
    assert guided is None and float(first) != pytest.approx(float(module(batch)), abs=1e-3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(15):
        loss, _ = module.training_losses(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss) < float(first) - 0.5, (float(first), float(loss))

# --- sequences ---------------------------------------------------------------------------------------------

def test_tts_loss_covers_exactly_target_speech_and_speech_end(tok: SpeechTokenizer) -> None:
    prompt_codes, target_codes = np.arange(17) % CODEBOOK, (np.arange(23) * 7) % CODEBOOK
    example = tts_sequence(tok, "Target words.", target_codes, "Prompt words.", prompt_codes)
    ids, labels = example.input_ids, example.labels
    assert ids[0] == tok.bos_id and ids[1] == tok.text_start_id and ids[-1] == tok.eos_id
    assert tok.decode_text(ids) == "Prompt words. Target words."
    loss_positions = np.flatnonzero(labels != IGNORE)
    assert len(loss_positions) == len(target_codes) + 1
    np.testing.assert_array_equal(labels[loss_positions], ids[loss_positions])
    np.testing.assert_array_equal(tok.token_to_code(ids[loss_positions[:-1]]), target_codes)
    assert ids[loss_positions[-1]] == tok.speech_end_id and loss_positions[-1] == len(ids) - 2
    # The voice prompt's codes sit right before the target's and carry no loss.
    speech_start = int(np.flatnonzero(ids == tok.speech_start_id)[0])
    np.testing.assert_array_equal(tok.token_to_code(ids[speech_start + 1: loss_positions[0]]), prompt_codes)
    # Generation starts from exactly the part before the target.
    np.testing.assert_array_equal(tts_prompt(tok, "Target words.", "Prompt words.", prompt_codes),
                                  ids[: loss_positions[0]])
    with pytest.raises(ValueError, match="both its transcript and its codes"):
        tts_prompt(tok, "x", prompt_text="only text")


def test_pretraining_example_masks(tok: SpeechTokenizer) -> None:
    codes = np.arange(30) % CODEBOOK
    cont = continuation_example(tok, codes)
    assert list(cont.input_ids[:2]) == [tok.bos_id, tok.speech_start_id]
    assert (cont.labels != IGNORE).sum() == len(codes) + 1 and cont.labels[-1] == IGNORE
    text = text_example(tok, SENTENCES[1])
    assert text.labels[0] == IGNORE and (text.labels[1:] == text.input_ids[1:]).all()
    assert text.input_ids[-1] == tok.eos_id and not tok.is_code(text.input_ids).any()
    plain = tts_sequence(tok, SENTENCES[2], codes)
    assert (plain.labels != IGNORE).sum() == len(codes) + 1
    assert tok.voice_start_id not in plain.input_ids


def test_pack_keeps_every_token_in_fixed_rows(tok: SpeechTokenizer) -> None:
    rng = np.random.default_rng(0)
    examples = [continuation_example(tok, rng.integers(0, CODEBOOK, int(n))) for n in rng.integers(1, 90, 25)]
    seq_len = 64
    rows = list(pack(examples, seq_len, tok.pad_id))
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["attention_mask"]) == seq_len for r in rows)
    kept = np.concatenate([r["input_ids"][r["attention_mask"] == 1] for r in rows])
    kept_labels = np.concatenate([r["labels"][r["attention_mask"] == 1] for r in rows])
    np.testing.assert_array_equal(kept, np.concatenate([e.input_ids for e in examples]))
    np.testing.assert_array_equal(kept_labels, np.concatenate([e.labels for e in examples]))
    total = sum(len(e) for e in examples)
    assert len(rows) == -(-total // seq_len)
    assert all(r["attention_mask"].all() for r in rows[:-1])  # only the last row is padded
    last = rows[-1]
    assert (last["labels"][last["attention_mask"] == 0] == IGNORE).all()
    assert (last["input_ids"][last["attention_mask"] == 0] == tok.pad_id).all()


def test_mixture_sampler_follows_weights_and_seed() -> None:
    weights = {"continuation": 0.2, "text": 0.1, "text_speech": 0.7}
    draws = [s for s, _ in zip(MixtureSampler(weights, seed=3), range(5000), strict=False)]
    counts = Counter(draws)
    for name, weight in weights.items():
        assert abs(counts[name] / len(draws) - weight) < 0.03
    sampler = MixtureSampler(weights, seed=3)
    assert [sampler.sample() for _ in range(200)] == draws[:200]
    other = MixtureSampler(weights, seed=4)
    assert [other.sample() for _ in range(200)] != draws[:200]
    assert set(MixtureSampler({"text": 1.0, "continuation": 0.0}, 0).sample() for _ in range(50)) == {"text"}
    with pytest.raises(ValueError, match="unknown mixture sources"):
        MixtureSampler({"speech": 1.0}, 0)
    with pytest.raises(ValueError, match="positive sum"):
        MixtureSampler({"text": 0.0}, 0)


def test_pretrain_dataset_streams_packed_rows(tok: SpeechTokenizer, shards: CodeShards) -> None:
    weights = {"continuation": 0.3, "text": 0.2, "text_speech": 0.5}
    dataset = PretrainDataset(shards, tok, weights, seq_len=48, seed=7)
    rows = [row for row, _ in zip(dataset, range(12), strict=False)]
    again = PretrainDataset(shards, tok, weights, seq_len=48, seed=7)
    again = [row for row, _ in zip(again, range(12), strict=False)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, again, strict=True))
    ids = torch.stack([r["input_ids"] for r in rows])
    assert ids.shape == (12, 48) and ids.max() < len(tok)
    assert all(r["attention_mask"].all() for r in rows), "an endless stream never pads"
    assert tok.is_code(ids).any() and (ids < tok.layout.text_vocab_size).any()
    assert (ids == tok.text_start_id).any() and (ids == tok.bos_id).sum() >= 2


def test_sft_dataset_prompts_with_another_utterance_of_the_same_speaker(
        tok: SpeechTokenizer, shards: CodeShards) -> None:
    dataset = SFTDataset(shards, tok, seed=0)
    assert len(dataset) == len(shards)
    by_id = {shards[i].id: shards[i] for i in range(len(shards))}
    prompted = 0
    for k in range(len(dataset)):
        item = dataset[k]
        target = by_id[item["id"]]
        if target.speaker == "lonely":
            assert item["prompt_id"] is None
            continue
        prompted += 1
        prompt = by_id[item["prompt_id"]]
        assert prompt.id != target.id and prompt.speaker == target.speaker
        assert (item["labels"] != IGNORE).sum() == len(target.codes) + 1
        assert tok.decode_text(item["input_ids"]) == prompt.text + " " + target.text
    assert prompted == len(shards) - 1
    same = SFTDataset(shards, tok, seed=0)
    prompts = [dataset.prompt_index(k) for k in range(len(dataset))]
    assert [same.prompt_index(k) for k in range(len(same))] == prompts
    reseeded = SFTDataset(shards, tok, seed=1)
    assert [reseeded.prompt_index(k) for k in range(len(reseeded))] != prompts

    # A length budget drops targets that cannot fit and picks only prompts that fit beside the target.
    budget = SFTDataset(shards, tok, seed=0, max_len=60, max_prompt_frames=30)
    assert 0 < len(budget) < len(shards)
    for k in range(len(budget)):
        item = budget[k]
        assert len(item["input_ids"]) <= 60
        if item["prompt_id"] is not None:
            assert len(by_id[item["prompt_id"]].codes) <= 30

    batch = pad_collate([dataset[0], dataset[1], dataset[2]], pad_id=tok.pad_id)
    lengths = [len(dataset[k]["input_ids"]) for k in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_id).all()
    assert batch["id"] == [dataset[k]["id"] for k in range(3)]


def test_sft_batch_trains_the_tiny_model(tok: SpeechTokenizer, shards: CodeShards) -> None:
    """Collated SFT batches feed the stock model; a few steps on one batch lower its loss."""
    torch.manual_seed(0)
    model = build_model(preset("tiny").model, len(tok), tok.layout.special_ids)
    loader = torch.utils.data.DataLoader(SFTDataset(shards, tok), batch_size=4,
                                         collate_fn=partial(pad_collate, pad_id=tok.pad_id))
    batch = next(iter(loader))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**inputs).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.5


# --- guided attention ---------------------------------------------------------------------------------------

def marker_ids(tok: SpeechTokenizer) -> tuple[int, int, int, int]:
    return tok.text_start_id, tok.text_end_id, tok.speech_start_id, tok.speech_end_id


def test_guided_attention_finds_each_whole_text_speech_example(tok: SpeechTokenizer) -> None:
    """Spans cover an example's text tokens (keys) and code tokens (queries), voice prompt included;
    continuation and text examples have none, and an example a packed row cuts off is left out."""
    rng = np.random.default_rng(0)
    tts = tts_sequence(tok, "Hello there.", rng.integers(0, CODEBOOK, 7), "A stitch in time.",
                       rng.integers(0, CODEBOOK, 5))
    plain = tts_sequence(tok, "She sells sea shells.", rng.integers(0, CODEBOOK, 9))
    stream = np.concatenate([continuation_example(tok, rng.integers(0, CODEBOOK, 4)).input_ids,
                             tts.input_ids, text_example(tok, "Is it raining?").input_ids, plain.input_ids])
    cut = len(stream) - 3  # the last example loses its [speech_end] and [eos] to the next row
    spans = text_speech_spans(torch.tensor(np.stack([stream[:cut], stream[3:cut + 3]])), *marker_ids(tok))
    assert [s.row for s in spans] == [0, 1, 1]
    first = spans[0]
    ids = stream[:cut]
    assert tok.decode_text(ids[first.text]) == "A stitch in time. Hello there."
    assert (tok.is_code(ids[first.speech])).all() and first.speech.stop - first.speech.start == 12
    assert ids[first.speech.stop] == tok.speech_end_id
    assert spans[2].speech.stop - spans[2].speech.start == 9  # row 1 holds the plain example whole


def test_guided_attention_loss_rewards_the_diagonal() -> None:
    """All attention on the diagonal costs ~0; on the anti-diagonal, or off the text, ~1; the loss has a
    gradient, for the guided heads only."""
    speech, text, extra = 12, 6, 4
    band = diagonal_band(speech, text, 0.2)
    assert band.shape == (speech, text) and float(band[0, 0]) == 1 and float(band[-1, 0]) < 0.1
    keys = extra + text + speech
    spans = text_speech_spans(torch.zeros(1, 1, dtype=torch.long), 1, 2, 3, 4)
    assert spans == []

    def attention(target: torch.Tensor, on_text: float = 1.0) -> torch.Tensor:
        a = torch.zeros(1, 2, keys, keys)
        rows = torch.arange(speech)
        a[0, :, extra + text + rows, extra + target] = on_text  # into the text ...
        a[0, :, extra + text + rows, 0] = 1 - on_text           # ... and the rest outside it
        return a.requires_grad_()

    span = [TextSpeechSpan(0, slice(extra, extra + text), slice(extra + text, extra + text + speech))]
    on = torch.arange(speech) * text // speech
    diagonal = guided_attention_loss([attention(on)], span, 0.2)
    elsewhere = guided_attention_loss([attention(on, on_text=0.3)], span, 0.2)
    anti = attention(text - 1 - on)
    anti_loss = guided_attention_loss([anti], span, 0.2, heads=[1])
    assert float(diagonal.detach()) < 0.05 and float(anti_loss.detach()) > 0.5
    assert float(elsewhere.detach()) == pytest.approx(0.7 + 0.3 * float(diagonal.detach()), abs=1e-5)
    anti_loss.backward()
    assert anti.grad is not None and anti.grad[0, 0].abs().sum() == 0 and anti.grad[0, 1].abs().sum() > 0


def test_guided_attention_trains_the_heads_onto_the_diagonal(tok: SpeechTokenizer,
                                                            shards: CodeShards) -> None:
    """The training module with guided attention on: one forward gives the next-token loss (as without it)
    and the guided loss, and steps on both lower the guided loss."""
    torch.manual_seed(0)
    model = build_model(preset("tiny").model, len(tok), tok.layout.special_ids)
    guided = {"weight": 1.0, "sigma": 0.2, "layers": None, "heads": [0]}
    optim = dict(preset("tiny").sft.optim)
    module = SpeechLMModule(hf_config_dict(model), optim, 10, layout=asdict(tok.layout), model=model,
                            guided_cfg=guided)
    loader = torch.utils.data.DataLoader(SFTDataset(shards, tok), batch_size=4,
                                         collate_fn=partial(pad_collate, pad_id=tok.pad_id))
    batch = next(iter(loader))
    lm_loss, first = module.training_losses(batch)
    assert float(lm_loss) == pytest.approx(float(module(batch)), abs=1e-5)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(30):
        lm_loss, guided_loss = module.training_losses(batch)
        (lm_loss + guided_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(guided_loss) < float(first) * 0.6, (float(first), float(guided_loss))


def test_scheduled_sampling_share_ramps_up_and_bad_settings_are_refused(tok: SpeechTokenizer) -> None:
    model = build_model(preset("tiny").model, len(tok), tok.layout.special_ids)
    optim = dict(preset("tiny").sft.optim)
    preset_sampling = OmegaConf.to_container(preset("tiny").sft.scheduled_sampling)
    sampling = {**preset_sampling, "share": 0.6, "ramp_steps": 4}
    module = SpeechLMModule(hf_config_dict(model), optim, 10, layout=asdict(tok.layout), model=model,
                            scheduled_sampling=sampling)
    assert [module.own_code_share(step) for step in (0, 2, 4, 9)] == pytest.approx([0.0, 0.3, 0.6, 0.6])
    flat = SpeechLMModule(hf_config_dict(model), optim, 10, layout=asdict(tok.layout), model=model,
                          scheduled_sampling={**sampling, "ramp_steps": 0})
    assert flat.own_code_share(0) == 0.6
    with pytest.raises(ValueError, match=r"share must lie in \(0, 1\]"):
        SpeechLMModule(hf_config_dict(model), optim, 10, layout=asdict(tok.layout), model=model,
                       scheduled_sampling={**sampling, "share": 1.5})
    with pytest.raises(ValueError, match="needs the vocabulary layout"):
        SpeechLMModule(hf_config_dict(model), optim, 10, model=model, scheduled_sampling=sampling)


def test_phrase_examples_are_a_few_words_with_their_codes(tok: SpeechTokenizer, tmp_path: Path) -> None:
    text = "She sells sea shells by the sea shore."
    codes = np.arange(80) % CODEBOOK
    cuts = [0, 10, 22, 30, 45, 50, 58, 66, 80]  # 8 words
    writer = ShardWriter(tmp_path / "train")
    writer.add("cut", codes, text, "spk", duration=0.8, word_cuts=cuts)
    writer.add("uncut", codes[:40], SENTENCES[0], "spk", duration=0.4)
    writer.close({"codebook_size": CODEBOOK, "frame_rate": 100.0, "sample_rate": 16000})
    shards = CodeShards(tmp_path / "train")
    assert shards[0].word_cuts == cuts and shards[1].word_cuts is None
    rng = np.random.default_rng(0)
    words = text.split()
    for _ in range(20):
        example = phrase_example(tok, shards[0], 3, rng)
        speech = example.input_ids[tok.is_code(example.input_ids)]
        starts = [i for i in range(6)
                  if np.array_equal(speech, tok.code_to_token(codes[cuts[i]: cuts[i + 3]]))]
        assert len(starts) == 1, "the codes are three consecutive words' codes"
        i = starts[0]
        expected = tts_sequence(tok, " ".join(words[i: i + 3]), codes[cuts[i]: cuts[i + 3]])
        assert np.array_equal(example.input_ids, expected.input_ids)
    whole = phrase_example(tok, shards[1], 2, rng)  # no word timings: the whole utterance
    assert np.array_equal(whole.input_ids, tts_sequence(tok, SENTENCES[0], codes[:40]).input_ids)
    longest = phrase_example(tok, shards[0], 99, rng)  # more words than it has: all of them
    assert np.array_equal(longest.input_ids, tts_sequence(tok, text, codes).input_ids)
    with pytest.raises(ValueError, match="word_cuts must be"):
        ShardWriter(tmp_path / "bad").add("x", codes, text, "spk", 0.8, word_cuts=[0, 10, 80])
    with pytest.raises(ValueError, match="char_starts must be"):
        ShardWriter(tmp_path / "bad").add("x", codes, text, "spk", 0.8, char_starts=[0, 30, 20])


def test_pretrain_dataset_refuses_phrases_without_word_timings(tok: SpeechTokenizer,
                                                                shards: CodeShards) -> None:
    with pytest.raises(ValueError, match="no word timings"):
        PretrainDataset(shards, tok, {"text_speech": 0.5, "phrase": 0.5}, seq_len=48)
    with pytest.raises(ValueError, match="phrase_words"):
        PretrainDataset(shards, tok, {"text_speech": 1.0}, seq_len=48, phrase_words=(3, 2))
    PretrainDataset(shards, tok, {"text_speech": 1.0, "phrase": 0.0}, seq_len=48)  # weight 0: not needed


# --- the interleaved format --------------------------------------------------------------------------------

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"


@pytest.fixture(scope="module")
def spoken_tok() -> SpeechTokenizer:
    return SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK,
                                 spoken_alphabet=ALPHABET)


def test_interleaved_tts_puts_each_character_before_its_codes(spoken_tok: SpeechTokenizer,
                                                                tmp_path: Path) -> None:
    text, codes = "Hi, bo!", np.arange(20) % CODEBOOK
    starts = [0, 4, 9, 10, 15]  # h i ' ' b o
    prompt_codes = np.arange(7)
    example = tts_sequence(spoken_tok, text, codes, "Ignored transcript.", prompt_codes, char_starts=starts)
    ids, labels = example.input_ids, example.labels
    prompt = tts_prompt(spoken_tok, text, "Ignored transcript.", prompt_codes)
    assert spoken_tok.decode_text(prompt) == text  # the voice prompt is its codes alone
    assert list(prompt[-9:]) == [spoken_tok.voice_start_id, *spoken_tok.code_to_token(prompt_codes),
                                 spoken_tok.voice_end_id]
    np.testing.assert_array_equal(ids[: len(prompt)], prompt)
    assert (labels[: len(prompt)] == IGNORE).all()
    chars = spoken_tok.spoken_char_ids(text)
    expected_ids, expected_labels = [], []
    for char, start, end in zip(chars, starts, [*starts[1:], len(codes)], strict=True):
        expected_ids += [char, *spoken_tok.code_to_token(codes[start:end])]
        expected_labels += [spoken_tok.advance_id, *spoken_tok.code_to_token(codes[start:end])]
    body = slice(len(prompt), len(ids) - 2)
    assert ids[body].tolist() == expected_ids and labels[body].tolist() == expected_labels
    assert ids[-2] == labels[-2] == spoken_tok.speech_end_id and labels[-1] == IGNORE
    assert len(chars) == 5 and spoken_tok.decode_text(chars) == "hi bo"
    with pytest.raises(ValueError, match="needs the character timings"):
        tts_sequence(spoken_tok, text, codes)
    with pytest.raises(ValueError, match="5 spoken characters but 3"):
        tts_sequence(spoken_tok, text, codes, char_starts=starts[:3])
    spoken_tok.save_pretrained(tmp_path / "tok")
    loaded = SpeechTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.interleaved and loaded.char_ids == spoken_tok.char_ids
    assert loaded.advance_id == spoken_tok.advance_id < loaded.code_offset


def test_lookahead_gives_the_next_characters_before_the_codes(tmp_path: Path) -> None:
    """With lookahead 2 the first three characters come before the first one's codes, each <|advance|>
    brings the character two ahead, and <|advance|> itself stands in once all are given."""
    tok = SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK,
                                spoken_alphabet=ALPHABET, lookahead=2)
    text, codes, starts = "Hi, bo!", np.arange(20) % CODEBOOK, [0, 4, 9, 10, 15]
    h, i, space, b, o = tok.spoken_char_ids(text)
    adv = tok.advance_id
    assert tok.spoken_feeds([h, i, space, b, o]) == ([h, i, space], [b, o, adv, adv])
    assert tok.spoken_feeds([h, i]) == ([h, i], [adv])  # fewer characters than the lookahead
    assert tok.spoken_feeds([h]) == ([h], [])
    prompt = tts_prompt(tok, text)
    start, feeds = generation_start(tok, prompt, [h, i, space, b, o])
    assert start.tolist() == [*prompt, h, i, space] and feeds == [b, o, adv, adv]
    ids, labels = interleaved_speech(tok, codes, [h, i, space, b, o], starts)
    c = tok.code_to_token(codes).tolist()
    assert ids.tolist() == [h, i, space, *c[0:4], b, *c[4:9], o, *c[9:10], adv, *c[10:15], adv, *c[15:20],
                            tok.speech_end_id]
    assert labels.tolist() == [adv, IGNORE, IGNORE, *c[0:4], adv, *c[4:9], adv, *c[9:10], adv, *c[10:15],
                               adv, *c[15:20], tok.speech_end_id]
    tok.save_pretrained(tmp_path / "tok")
    assert SpeechTokenizer.from_pretrained(tmp_path / "tok").layout.lookahead == 2
    with pytest.raises(ValueError, match="lookahead -1"):
        SpeechTokenizer.build(train_text_tokenizer(SENTENCES, vocab_size=300), CODEBOOK,
                              spoken_alphabet=ALPHABET, lookahead=-1)
    with pytest.raises(ValueError, match="0 without a spoken alphabet"):
        SpeechTokenizer.build(train_text_tokenizer(SENTENCES, vocab_size=300), CODEBOOK, lookahead=1)
    with pytest.raises(ValueError, match="no spoken character"):
        tok.spoken_feeds([])


def interleaved_shards(tmp_path: Path, alphabet: str | None = ALPHABET) -> CodeShards:
    """Two speakers with 3 utterances each, every one with character timings (one frame per 2 codes
    per character, spread evenly)."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path / "spoken")
    for i in range(6):
        text = SENTENCES[i]
        chars = len(" ".join("".join(c for c in text.lower() if c in ALPHABET).split()))
        n = 3 * chars
        writer.add(f"utt{i}", rng.integers(0, CODEBOOK, n), text, f"spk{i % 2}", duration=n / 100,
                   char_starts=list(range(0, n, 3)))
    writer.close({"codebook_size": CODEBOOK, "frame_rate": 100.0, "sample_rate": 16000, "alphabet": alphabet})
    return CodeShards(tmp_path / "spoken")


def test_interleaved_datasets_train_on_characters_and_codes(spoken_tok: SpeechTokenizer,
                                                            tmp_path: Path) -> None:
    shards = interleaved_shards(tmp_path)
    sft = SFTDataset(shards, spoken_tok, seed=0, max_len=4000)
    item = sft[0]
    target, prompt = shards[int(sft.targets[0])], item["prompt_id"]
    assert prompt is not None and prompt != target.id
    labels = item["labels"]
    assert (labels == spoken_tok.advance_id).sum() == len(target.char_starts)
    assert spoken_tok.is_code(labels).sum() == len(target.codes)
    stream = PretrainDataset(shards, spoken_tok, {"text_speech": 1.0}, seq_len=256, seed=0)
    row = next(iter(stream))
    assert (row["labels"] == spoken_tok.advance_id).any()
    with pytest.raises(ValueError, match="phrases are for the plain format"):
        PretrainDataset(shards, spoken_tok, {"text_speech": 1.0, "phrase": 0.5}, seq_len=256)
    other = interleaved_shards(tmp_path / "other", alphabet="abc")
    with pytest.raises(ValueError, match="character timings for 'abc'"):
        SFTDataset(other, spoken_tok)


# --- phonemes in place of letters --------------------------------------------------------------------------


def test_espeak_phonemizes_words_without_stress_marks() -> None:
    assert word_phonemes("thought", "en-us") == ("T", "O:", "t")
    assert word_phonemes("though", "en-us") == ("D", "oU")  # the spelling says little about the sound
    assert word_phonemes("'", "en-us") == ()
    with pytest.raises(ValueError, match="no voice 'xx-nowhere'"):
        word_phonemes("hello", "xx-nowhere")


def test_phoneme_symbols_are_one_distinct_character_each() -> None:
    names = ["t", "aI", "dZ", "@", "T", "O:"]
    symbols = phoneme_symbols(names)
    assert set(symbols) == set(names) and len(set(symbols.values())) == len(names)
    assert symbols["t"] == "t" and symbols["@"] == "@"  # one-character names stand for themselves
    assert all(len(s) == 1 and s != " " for s in symbols.values())
    assert phoneme_symbols(reversed(names)) == symbols  # the same inventory, the same symbols


def test_phoneme_timings_spread_each_word_over_its_letters() -> None:
    words = ["so", "thought"]  # letters "so thought": s o ' ' t h o u g h t
    letter_starts = [0, 4, 10, 12, 14, 16, 18, 20, 22, 24]
    units = spoken_phonemes(words, "en-us")
    assert [u.name for u in units] == ["s", "oU", " ", "T", "O:", "t"]
    starts = phoneme_starts(words, units, letter_starts, frames=30)
    # "so": 2 letters, 2 phonemes -> its letters' starts; "thought": 7 letters, 3 phonemes -> positions
    # 0, 7/3 and 14/3 of its letters, read off their starts (12 + ... by linear interpolation)
    assert starts == [0, 4, 10, 12, 16, 21]
    with pytest.raises(ValueError, match="3 letter timings"):
        phoneme_starts(words, units, letter_starts[:3], 30)
    crowded = [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]  # collapsed alignment: starts are pushed apart, one frame each
    assert phoneme_starts(words, units, crowded, frames=30) == [0, 1, 2, 3, 4, 5]
    assert phoneme_starts(words, units, crowded, frames=5) is None  # 6 phonemes cannot fit in 5 codes


def test_phoneme_tokenizer_says_phonemes_at_their_timings(tmp_path: Path) -> None:
    texts = [t.lower() for t in SENTENCES]
    symbols = phoneme_symbols(phoneme_inventory([*texts, "so thought"], "en-us"))
    tok = SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK,
                                spoken_alphabet=ALPHABET, phonemes=symbols, phoneme_voice="en-us")
    text = "So, thought!"
    ids = tok.spoken_char_ids(text)
    said = ["s", "oU", " ", "T", "O:", "t"]
    assert tok.decode_text(ids) == "".join(symbols.get(name, " ") for name in said)
    letter_starts = [0, 4, 10, 12, 14, 16, 18, 20, 22, 24]
    codes = np.arange(30) % CODEBOOK
    starts = tok.spoken_timings(text, letter_starts, len(codes))
    assert starts == [0, 4, 10, 12, 16, 21]
    example = tts_sequence(tok, text, codes, char_starts=letter_starts)
    speech, labels = interleaved_speech(tok, codes, ids, starts)
    prompt = tts_prompt(tok, text)
    assert example.input_ids.tolist() == [*prompt, *speech, tok.eos_id]
    assert (example.labels == tok.advance_id).sum() == len(ids) == 6
    assert tok.is_code(example.labels).sum() == len(codes)
    with pytest.raises(ValueError, match="do not fit"):
        tts_sequence(tok, text, codes[:5], char_starts=[0, 1, 2, 3, 3, 3, 3, 3, 3, 3])
    tok.save_pretrained(tmp_path / "tok")
    loaded = SpeechTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.layout.phonemes == symbols and loaded.spoken_char_ids(text) == ids
    without = SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK,
                                    spoken_alphabet=ALPHABET, phoneme_voice="en-us",
                                    phonemes={n: c for n, c in symbols.items() if n != "O:"})
    assert len(without.spoken_char_ids(text)) == 5  # a phoneme without a symbol is left out, timing too
    assert without.spoken_timings(text, letter_starts, len(codes)) == [0, 4, 10, 12, 21]
    with pytest.raises(ValueError, match="need the spoken alphabet"):
        SpeechTokenizer.build(train_text_tokenizer(SENTENCES, vocab_size=300), CODEBOOK, phonemes=symbols,
                              phoneme_voice="en-us")


def test_phoneme_datasets_train_on_phonemes_and_codes(tmp_path: Path) -> None:
    shards = interleaved_shards(tmp_path)
    symbols = phoneme_symbols(phoneme_inventory([t.lower() for t in SENTENCES], "en-us"))
    tok = SpeechTokenizer.build(train_text_tokenizer(SENTENCES * 4, vocab_size=300), CODEBOOK,
                                spoken_alphabet=ALPHABET, phonemes=symbols, phoneme_voice="en-us")
    sft = SFTDataset(shards, tok, seed=0, max_len=4000)
    assert len(sft) == len(shards)
    item = sft[0]
    target = shards[int(sft.targets[0])]
    assert (item["labels"] == tok.advance_id).sum() == len(tok.spoken_char_ids(target.text))
    assert len(tok.spoken_char_ids(target.text)) < len(target.char_starts)  # fewer phonemes than letters
    assert tok.is_code(item["labels"]).sum() == len(target.codes)
    row = next(iter(PretrainDataset(shards, tok, {"text_speech": 1.0}, seq_len=256, seed=0)))
    assert (row["labels"] == tok.advance_id).any()

"""The SpeechLM stages end to end through the real command line on the tiny corpus: codec -> tokenize ->
pretrain -> sft (full and LoRA). Checks the run folders, that hf/ loads as a stock Hugging Face model with
its tokenizer, that training lowers the loss, that a re-run resumes from the last step, and that LoRA is
merged into a plain model."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import GREEDY, PRETRAIN_STEPS, export, start_server, train
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from voxlm.codec.losses import spoken_characters
from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.data.shards import CodeShards
from voxlm.eval.text_use import speech_given_text, text_use
from voxlm.rlhf.stage import FeedCharacters, prompt_text
from voxlm.serve.backends import max_backend
from voxlm.serve.engine import Audio, Done, Engine, EngineConfig, SpeechRequest
from voxlm.speechlm.code_grid import has_code_grid
from voxlm.speechlm.generate import SamplingConfig, generate_codes
from voxlm.speechlm.model import load_speechlm, speechlm_codec
from voxlm.speechlm.module import SpeechLMModule
from voxlm.speechlm.sequences import generation_start, pad_collate, tts_prompt, tts_sequence
from voxlm.speechlm.stage import val_rows
from voxlm.speechlm.tokenizer import SpeechTokenizer
from voxlm.speechlm.voices import Voice

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def val_loss(model: LlamaForCausalLM, tok: SpeechTokenizer, shards: Path) -> float:
    """Mean TTS loss over the val split's first packed rows: a fixed batch, for any model."""
    rows = val_rows(CodeShards(shards / "val"), tok, seq_len=256)[:4]
    batch = pad_collate([{k: v.numpy() for k, v in row.items()} for row in rows], tok.pad_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()


def test_pretrain_writes_a_hugging_face_model_and_tokenizer(pretrain_run: Path, shards: Path) -> None:
    for name in ("config.yaml", "checkpoints/last.ckpt", "tokenizer/speech_layout.json", "hf/config.json",
                 "hf/model.safetensors", "hf/speech_layout.json", "hf/tokenizer.json"):
        assert (pretrain_run / name).exists(), name
    assert (pretrain_run.parent / "latest").resolve() == pretrain_run.resolve()
    m = metrics(pretrain_run)
    assert m["steps"] == m["global_step"] == PRETRAIN_STEPS
    assert m["tokens_seen"] == PRETRAIN_STEPS * 2 * 256  # batch_size packed rows of seq_len, no padding
    assert m["tokens_per_s"] > 0 and math.isfinite(m["val/loss"])
    assert m["val/ppl"] == pytest.approx(math.exp(m["val/loss"]), rel=1e-4)

    model = AutoModelForCausalLM.from_pretrained(pretrain_run / "hf", local_files_only=True)
    assert isinstance(model, LlamaForCausalLM) and model.config.hidden_size == 64
    tok = SpeechTokenizer.from_pretrained(pretrain_run / "hf", codebook_size=64)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_id
    utterance = CodeShards(shards / "train")[0]
    assert tok.decode_text(tok.encode_text(utterance.text)) == utterance.text
    code_ids = tok.code_to_token(np.asarray(utterance.codes))
    np.testing.assert_array_equal(tok.token_to_code(code_ids), utterance.codes)
    plain = AutoTokenizer.from_pretrained(pretrain_run / "hf", local_files_only=True)  # no voxlm needed
    assert plain.convert_ids_to_tokens(int(code_ids[0])) == f"<|c_{int(utterance.codes[0])}|>"


def test_tokenize_stores_word_timings_that_phrases_are_cut_at(shards: Path) -> None:
    """The codec trained with its CTC head, so every utterance's words and characters come with their
    frames."""
    train_shards = CodeShards(shards / "train")
    assert train_shards.meta["word_cuts"] == len(train_shards)
    for i in range(len(train_shards)):
        utterance = train_shards[i]
        cuts = utterance.word_cuts
        assert len(cuts) == len(utterance.text.split()) + 1
        assert cuts[0] == 0 and cuts[-1] == len(utterance.codes) and cuts == sorted(cuts)
        starts = utterance.char_starts
        assert len(starts) == len(spoken_characters(utterance.text, train_shards.meta["alphabet"]))
        assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(utterance.codes)


def test_interleaved_pipeline_trains_speaks_exports_and_serves(workspace: Path, tiny_corpus: Path,
                                                               shards: Path, tiny_voices: Path,
                                                               tmp_path: Path) -> None:
    """speechlm.tokenizer.interleave=true, speaking phonemes (spoken=phonemes) with a lookahead of 2, end
    to end on the tiny corpus: pretrain and SFT on phonemes interleaved with their codes at timings read off
    the letters' alignment (unit tests cover letters), synth.py speaks through the codec, export
    passes its parity gate, the MAX engine streams what offline generation makes when fed the same
    characters, the HTTP server speaks and refuses a text with no letter, GRPO (its rollouts fed their
    characters) and DPO align it, and text_use scores it."""
    spoken = ("speechlm.tokenizer.interleave=true", "speechlm.tokenizer.lookahead=2",
              "speechlm.tokenizer.spoken=phonemes")
    train(workspace, tiny_corpus, "pretrain", "run_name=spoken", "speechlm.pretrain.val_check_interval=3",
          f"speechlm.pretrain.max_steps={PRETRAIN_STEPS}", *spoken)
    pretrained = workspace / "runs/pretrain/spoken"
    tok = SpeechTokenizer.from_pretrained(pretrained / "hf")
    train_shards = CodeShards(shards / "train")
    assert tok.interleaved and tok.layout.spoken_alphabet == train_shards.meta["alphabet"]
    assert tok.layout.lookahead == 2 and "aI" in tok.layout.phonemes and tok.layout.phoneme_voice == "en-us"
    m = metrics(pretrained)
    assert m["train/loss"] < m["train_loss_first"] - 0.3
    train(workspace, tiny_corpus, "sft", "run_name=spoken", "stage.pretrain_run=spoken", *spoken)
    sft = workspace / "runs/sft/spoken"
    assert SpeechTokenizer.from_pretrained(sft / "hf").layout.lookahead == 2
    codec_pt = Path(train_shards.meta["codec_run"]) / "codec.pt"
    out = tmp_path / "spoken.wav"
    result = subprocess.run([sys.executable, str(ROOT / "synth.py"), "text=Hello there.", f"speechlm={sft}",
                             f"codec={codec_pt}", f"out={out}", "stream=true", "length.base_seconds=0.5"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.exists() and out.stat().st_size > 1000

    artifact_dir = workspace / "artifacts/spoken"
    exported = export(workspace, tiny_corpus, f"speechlm={sft}", f"out={artifact_dir}",
                      f"voices_dir={tiny_voices}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((artifact_dir / "parity.json").read_text())["passed"]
    backend = max_backend(artifact_dir)
    assert backend.tokenizer.layout.lookahead == 2
    assert backend.tokenizer.layout.phonemes == tok.layout.phonemes
    sampling = SamplingConfig(do_sample=False, repetition_window=8)
    engine = Engine(backend, EngineConfig(trim_leading_silence=False, chunk_frames=(3, 5), min_seconds=0),
                    sampling).start()
    voice = Voice.load(sorted(tiny_voices.iterdir())[0])
    texts = ["Hello there.", "The quick brown fox."]
    events: list[list] = [[] for _ in texts]
    finished = threading.Semaphore(0)
    try:
        for i, text in enumerate(texts):
            prompt, feeds = generation_start(tok, tts_prompt(tok, text, voice.text, voice.codes),
                                             tok.spoken_char_ids(text))
            engine.submit(SpeechRequest(prompt, 60, lambda e, i=i: (events[i].append(e), isinstance(e, Audio)
                                                                     or finished.release()),
                                        time.monotonic() + 120, feeds=feeds))
        for _ in texts:
            assert finished.acquire(timeout=120)
    finally:
        engine.stop()
    prompts = [tts_prompt(tok, t, voice.text, voice.codes) for t in texts]
    reference = generate_codes(backend.model, tok, prompts, 60, sampling,
                               spoken=[tok.spoken_char_ids(t) for t in texts])
    for got, codes, truncated in zip(events, reference.codes, reference.truncated, strict=True):
        assert isinstance(got[-1], Done) and got[-1].frames == len(codes) and got[-1].truncated == truncated
        audio = np.concatenate([e.samples for e in got if isinstance(e, Audio)])
        np.testing.assert_allclose(audio, backend.decoder.decode(codes[None])[0].numpy(), atol=1e-4)
    server = start_server(f"artifact={artifact_dir}", f"api.voices_dir={tiny_voices}", *GREEDY)
    try:
        body = {"model": "tts-1", "voice": voice.name, "response_format": "wav"}
        said = httpx.post(f"{server.url}/v1/audio/speech", json=body | {"input": "Hello there."}, timeout=120)
        assert said.status_code == 200 and len(said.content) > 1000
        refused = httpx.post(f"{server.url}/v1/audio/speech", json=body | {"input": "@#"}, timeout=60)
        assert refused.status_code == 400 and "no letter this model speaks" in refused.text
    finally:
        server.stop()

    # GRPO's rollouts come from voxlm's sampler, which feeds the characters; the loss leaves them out.
    model = AutoModelForCausalLM.from_pretrained(sft / "hf", local_files_only=True)
    rows = {prompt_text(tok, prompt): (prompt, tok.spoken_char_ids(text), 40)
            for prompt, text in zip(prompts, texts, strict=True)}
    rollout = FeedCharacters(model, tok, rows, SamplingConfig(temperature=1.0, top_k=50, seed=0))
    keys = [key for key in rows for _ in range(2)]  # TRL repeats each prompt num_generations times
    out = rollout(keys)
    assert rollout(keys)["completion_ids"] != out["completion_ids"]  # each call draws afresh
    fed = set(tok.char_ids.values())
    for key, start, completion, mask, speech in zip(keys, out["prompt_ids"], out["completion_ids"],
                                                    out["env_mask"], out["speech_ids"], strict=True):
        spoken = rows[key][1]
        assert start == generation_start(tok, rows[key][0], spoken)[0].tolist() and set(start[-3:]) <= fed
        assert mask == [0 if token in fed else 1 for token in completion]
        # The speech judged: the codes (and [speech_end]), without the characters or a lookahead's moves.
        assert speech == [token for token in completion if token not in fed and token != tok.advance_id]
    assert any(0 in mask for mask in out["env_mask"])
    train(workspace, tiny_corpus, "rlhf", "run_name=spoken-grpo", "stage.sft_run=spoken", "algorithm=grpo",
          "algorithm.max_steps=2", "algorithm.batch_size=4", "algorithm.num_generations=2",
          "stage.prompts.max_prompts=4", "algorithm.warmup_steps=0", "stage.evaluate.enabled=false")
    grpo = workspace / "runs/rlhf/spoken-grpo"
    m = metrics(grpo)
    # Judged as speech: were the fed characters left in, every rollout would be "text tokens inside".
    assert m["invalid_completions"]["scored"] == 8 and m["invalid_completions"]["text tokens inside"] == 0
    assert [entry["step"] for entry in m["log_history"] if "loss" in entry] == [1, 2]
    assert len(changed_weights(grpo, sft)) > 10
    train(workspace, tiny_corpus, "rlhf", "run_name=spoken", "stage.sft_run=spoken", "algorithm=dpo",
          "algorithm.max_steps=2", "algorithm.batch_size=2", "algorithm.num_generations=3",
          "stage.prompts.max_prompts=4", "algorithm.warmup_steps=0", "stage.evaluate.enabled=false",
          "algorithm.min_reward_gap=0.0")  # a 4-step model's candidates all sound alike to the judges
    aligned = workspace / "runs/rlhf/spoken"
    pairs = [json.loads(line) for line in (aligned / "preferences.jsonl").read_text().splitlines()]
    # The pairs hold what the model read: its prompt with the first characters, the rest fed in the speech.
    assert pairs and all(p["prompt_ids"][-4] == tok.voice_end_id and set(p["prompt_ids"][-3:]) <= fed
                         for p in pairs)
    assert any(fed & set(p["chosen_ids"]) for p in pairs)
    assert len(changed_weights(aligned, sft)) > 10
    model = AutoModelForCausalLM.from_pretrained(sft / "hf", local_files_only=True)
    use = text_use(model, tok, train_shards, count=4)
    assert len(use.ids) == 4 and all(np.isfinite(use.losses[c]).all() for c in use.losses)
    first = train_shards[[row["id"] for row in train_shards.rows].index(use.ids[0])]
    example = speech_given_text(tok, first.text, first)
    assert (example.labels == tok.advance_id).sum() == 0  # the codes' loss only
    np.testing.assert_array_equal(example.input_ids, tts_sequence(tok, first.text, first.codes,
                                                                  char_starts=first.char_starts).input_ids)


def test_code_grid_trains_resumes_and_saves_a_folded_stock_model(tmp_path: Path, tiny_corpus: Path,
                                                                   shards: Path) -> None:
    """A pretrain run with the tiny codec's FSQ levels ([4, 4, 4]), interrupted and resumed, then SFT; in a
    runs/ tree of its own, so the shared one's `latest` runs stay the fixtures'."""
    grid = ["speechlm.model.code_grid=[4,4,4]", f"stage.tokenize_run={shards.parent}"]
    train(tmp_path, tiny_corpus, "pretrain", "run_name=grid", *grid, "speechlm.pretrain.max_steps=2",
          "speechlm.pretrain.val_check_interval=2")
    output = train(tmp_path, tiny_corpus, "pretrain", "run_name=grid", *grid, "speechlm.pretrain.max_steps=4",
                   "speechlm.pretrain.val_check_interval=2")
    assert "resuming from" in output
    run = tmp_path / "runs/pretrain/grid"
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["code_grid"]["levels"] == [4, 4, 4]
    assert ckpt["hyper_parameters"]["code_grid"]["init_std"] > 0  # fresh tables for a model from scratch
    tables = [v for k, v in ckpt["state_dict"].items() if k.endswith("parametrizations.weight.0.table")]
    assert tables and tables[0].shape[0] == 12 and tables[0].abs().sum() > 0
    saved = load_file(run / "hf/model.safetensors")
    assert "model.embed_tokens.weight" in saved and not any("parametrizations" in k for k in saved)
    # The folded stock model computes what the grid-trained one does.
    trained = SpeechLMModule.load_from_checkpoint(run / "checkpoints/last.ckpt", map_location="cpu")
    assert has_code_grid(trained.model.eval())
    model = AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True)
    tok = SpeechTokenizer.from_pretrained(run / "hf")
    assert val_loss(model, tok, shards) == pytest.approx(val_loss(trained.model, tok, shards), abs=1e-5)
    # Fine-tuning adds the grid at zero, so it starts from the pretrained model's outputs.
    train(tmp_path, tiny_corpus, "sft", "run_name=grid", "stage.pretrain_run=grid", grid[0],
          "speechlm.sft.max_steps=2", "speechlm.sft.val_check_interval=2")
    sft = tmp_path / "runs/sft/grid"
    ckpt = torch.load(sft / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["code_grid"] == {"levels": [4, 4, 4], "init_std": 0.0}
    assert not any("parametrizations" in k for k in load_file(sft / "hf/model.safetensors"))


def test_pretraining_lowers_the_loss(pretrain_run: Path, shards: Path) -> None:
    m = metrics(pretrain_run)
    assert m["train/loss"] < m["train_loss_first"] - 0.3
    tok = SpeechTokenizer.from_pretrained(pretrain_run / "hf")
    trained = AutoModelForCausalLM.from_pretrained(pretrain_run / "hf", local_files_only=True)
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(LlamaConfig.from_pretrained(pretrain_run / "hf"))
    assert val_loss(trained, tok, shards) < val_loss(untrained, tok, shards) - 0.3


def test_pretrain_resumes_from_its_last_step(workspace: Path, tiny_corpus: Path, pretrain_run: Path) -> None:
    before = metrics(pretrain_run)
    tokenizer_mtime = (pretrain_run / "tokenizer/tokenizer.json").stat().st_mtime_ns
    hf_mtime = (pretrain_run / "hf/model.safetensors").stat().st_mtime_ns
    # One row per step from here on: a run that restarted from step 0 would count 8 x 256 tokens.
    output = train(workspace, tiny_corpus, "pretrain", "run_name=slm", "speechlm.pretrain.max_steps=8",
                   "speechlm.pretrain.val_check_interval=3", "speechlm.pretrain.batch_size=1")
    assert "resuming from" in output
    after = metrics(pretrain_run)
    assert after["global_step"] == after["steps"] == 8
    assert after["tokens_seen"] == before["tokens_seen"] + 2 * 256  # steps 7 and 8 only, on 1 row each
    assert (pretrain_run / "hf/model.safetensors").stat().st_mtime_ns != hf_mtime  # hf/ is the new state
    assert (pretrain_run / "tokenizer/tokenizer.json").stat().st_mtime_ns == tokenizer_mtime  # re-used
    ckpt = torch.load(pretrain_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["hyper_parameters"]["max_steps"] == 8


def test_sft_fine_tunes_the_pretrained_model(sft_runs: dict[str, Path], pretrain_run: Path) -> None:
    run = sft_runs["full"]
    m = metrics(run)
    assert m["steps"] == 4 and m["pretrain_run"] == str(pretrain_run.resolve()) and not m["lora"]
    assert m["tokenize_run"] == metrics(pretrain_run)["tokenize_run"]  # the shards pretraining used
    assert math.isfinite(m["val/loss"]) and m["tokens_per_s"] > 0
    base = load_file(pretrain_run / "hf/model.safetensors")
    tuned = load_file(run / "hf/model.safetensors")
    assert base.keys() == tuned.keys()
    assert all(not torch.equal(base[k], tuned[k]) for k in base if "proj" in k)  # every weight trained
    assert (run / "hf/speech_layout.json").read_text() == (pretrain_run / "hf/speech_layout.json").read_text()


def test_the_speechlm_names_the_codec_whose_codes_it_learned(workspace: Path, sft_runs: dict[str, Path],
                                                             shards: Path, tmp_path: Path) -> None:
    """Tokenizing records the codec's code fingerprint, training carries it into the SpeechLM's layout, and
    loading the model with a codec that gives other codes (same shape, other weights) is refused."""
    tiny = workspace / "runs/codec/tiny"
    codec = load_codec(tiny).eval()
    ours = codec.code_fingerprint()
    assert CodeShards(shards / "train").codec_id == ours
    _, tok = load_speechlm(sft_runs["full"], codec.codebook_size, codec_id=ours)
    assert tok.layout.codec_id == ours
    # Unless told otherwise, synth, serve, export and RLHF pair a SpeechLM with the codec it was trained on.
    assert Path(speechlm_codec(sft_runs["full"], None, "latest")).resolve() == tiny.resolve()
    assert Path(speechlm_codec(sft_runs["full"] / "hf", None, "latest")).resolve() == tiny.resolve()
    assert speechlm_codec(sft_runs["full"], "runs/codec/other", "latest") == "runs/codec/other"
    bare = tmp_path / "bare-speechlm"  # a save_pretrained folder outside any run: nothing says
    shutil.copytree(sft_runs["full"] / "hf", bare)
    assert speechlm_codec(bare, None, "latest") == "latest"
    # The error names the codec to pass: the SFT run's tokenize run's codec.
    torch.manual_seed(1)
    other = Codec(**codec.config)
    with pytest.raises(ValueError, match="learned the codes of codec .*: pass the codec its code shards.* "
                                         "trained on the codes of the codec in .*runs/codec/tiny$"):
        load_speechlm(sft_runs["full"], codec.codebook_size, codec_id=other.code_fingerprint())


def test_text_use_scores_the_same_speech_under_three_texts(sft_runs: dict[str, Path], shards: Path) -> None:
    val = CodeShards(shards / "val")
    model, tok = load_speechlm(sft_runs["full"], val.codebook_size)
    use = text_use(model, tok, val, count=3, seed=1)
    assert len(use.ids) == 3 and all(np.isfinite(use.losses[c]).all() for c in ("own", "other", "none"))
    by_id = {val[i].id: val[i] for i in range(len(val))}
    first, second = by_id[use.ids[0]], by_id[use.ids[1]]
    for condition, text in (("own", first.text), ("other", second.text), ("none", "")):
        example = tts_sequence(tok, text, np.asarray(first.codes))  # Hugging Face's own shifted loss
        with torch.no_grad():
            expected = model(input_ids=torch.as_tensor(example.input_ids)[None],
                             labels=torch.as_tensor(example.labels)[None]).loss.item()
        assert use.losses[condition][0] == pytest.approx(expected, rel=1e-5)
    gap, error = use.gap("other")
    assert gap == pytest.approx(float(np.mean(use.losses["other"] - use.losses["own"]))) and error >= 0
    result = subprocess.run([sys.executable, str(ROOT / "scripts/text_use.py"), str(sft_runs["full"]),
                             "--shards", str(shards / "val"), "--count", "3", "--seed", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"| {sft_runs['full']} | {use.mean('own'):.3f} | {use.mean('other'):.3f}" in result.stdout


def test_sft_lora_saves_a_merged_plain_model(sft_runs: dict[str, Path], pretrain_run: Path,
                                             shards: Path) -> None:
    run = sft_runs["lora"]
    m = metrics(run)
    assert m["lora"] and m["trainable_parameters"] < m["parameters"] / 5
    assert m["precision"] == "bf16-mixed" and metrics(sft_runs["full"])["precision"] == "32-true"
    assert not (run / "hf/adapter_config.json").exists()
    hparams = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)[
        "hyper_parameters"]
    assert hparams["code_grid"] is None and hparams["code_noise"] == 0.2
    assert hparams["scheduled_sampling"]["share"] == 0.3 and hparams["scheduled_sampling"]["passes"] == 2
    assert hparams["grid_smoothing"] == {"weight": 0.5, "sigma": 0.25, "levels": [4, 4, 4]}
    base = load_file(pretrain_run / "hf/model.safetensors")
    merged = load_file(run / "hf/model.safetensors")
    assert merged.keys() == base.keys()  # no lora_A/lora_B, no PEFT prefixes
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # the adapters went in
    # The merged plain model computes what the trained adapters do.
    model = AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True)
    adapted = SpeechLMModule.load_from_checkpoint(run / "checkpoints/last.ckpt", map_location="cpu").eval()
    assert type(adapted.model).__name__ == "PeftModelForCausalLM"
    tok = SpeechTokenizer.from_pretrained(run / "hf")
    assert val_loss(model, tok, shards) == pytest.approx(val_loss(adapted.model, tok, shards), abs=1e-4)


def test_eval_tts_report(workspace: Path, tiny_corpus: Path, sft_runs: dict[str, Path]) -> None:
    """scripts/eval_tts.py end to end on the tiny SFT model: every judge runs on the real splits, the
    ground truth scores as real speech, and the report, table and samples are written."""
    out = workspace / "tts-eval"
    args = ["experiment=tiny", f"paths.root_dir={workspace}", f"paths.data_dir={tiny_corpus.parent}",
            f"eval.speechlm_run={sft_runs['full']}", "eval.max_utterances=3", "eval.batch_size=2",
            "eval.num_samples=1", "eval.length.base_seconds=1.0", "eval.length.seconds_per_text_token=0.1",
            f"eval.out={out}"]
    result = subprocess.run([sys.executable, str(ROOT / "scripts/eval_tts.py"), *args], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "tts_eval.json").read_text())
    assert set(report["conditions"]) == {"test_seen", "test_unseen"}
    for name, rows in report["conditions"].items():
        assert set(rows) == {"synth", "ground_truth", "codec_resynth"}
        assert rows["synth"]["n"] == len(report["records"][name]) > 0
        # Whisper reads the synthesizers' own recordings (noise scores ~1; on these 3 sentences the espeak
        # voices, which Whisper tiny.en half misreads, bring the ground truth to ~0.3-0.65)
        assert rows["ground_truth"]["wer"] < 0.75
        assert rows["ground_truth"]["speaker_sim"] > 0.7  # the reference is the same speaker
        assert rows["synth"]["rtf"] > 0 and 0 <= rows["synth"]["truncated_share"] <= 1
        low, high = report["intervals"][name]["speaker_sim"][1:]
        assert low <= rows["synth"]["speaker_sim"] <= high
        voices = report["by_speaker"][name]  # the pooled rows, split by voice
        assert set(voices) == {record["speaker"] for record in report["records"][name]}
        assert sum(row["n"] for row in voices.values()) == rows["synth"]["n"]
        if len(voices) == 1:
            assert next(iter(voices.values()))["wer"] == pytest.approx(rows["synth"]["wer"])
    assert report["judge"]["beam_size"] == 5  # configs/train.yaml's judges.asr
    markdown = (out / "tts_eval.md").read_text()
    assert "| test_seen/synth |" in markdown and "## test_unseen by voice" in markdown
    assert len(list((out / "samples").rglob("*.wav"))) == 6  # 1 sample x 3 wavs x 2 conditions


RLHF_TINY = ("stage.prompts.max_prompts=4", "algorithm.warmup_steps=0", "algorithm.save_steps=1",
             "stage.sft_run=full")


@pytest.fixture(scope="module")
def rlhf_runs(workspace: Path, tiny_corpus: Path, sft_runs: dict[str, Path]) -> dict[str, Path]:
    grpo = ("run_name=grpo", "algorithm=grpo", "algorithm.batch_size=4", "algorithm.num_generations=2",
            "stage.evaluate.enabled=false", *RLHF_TINY)
    train(workspace, tiny_corpus, "rlhf", *grpo, "algorithm.max_steps=2")
    resumed = train(workspace, tiny_corpus, "rlhf", *grpo, "algorithm.max_steps=3")
    # A 4-step model's candidates sound much alike to the judges: a small gap still ranks them.
    train(workspace, tiny_corpus, "rlhf", "run_name=dpo", "algorithm=dpo", "algorithm.max_steps=2",
          "algorithm.batch_size=2", "algorithm.num_generations=3", "stage.evaluate.max_utterances=2",
          "algorithm.min_reward_gap=0.001", *RLHF_TINY)
    return {"grpo": workspace / "runs/rlhf/grpo", "dpo": workspace / "runs/rlhf/dpo", "resumed_log": resumed}


def changed_weights(run: Path, sft_run: Path) -> list[str]:
    base, tuned = load_file(sft_run / "hf/model.safetensors"), load_file(run / "hf/model.safetensors")
    assert base.keys() == tuned.keys()
    return [name for name in base if not torch.equal(base[name], tuned[name])]


def test_grpo_trains_on_the_audio_rewards_and_resumes(rlhf_runs: dict, sft_runs: dict[str, Path]) -> None:
    run = rlhf_runs["grpo"]
    m = metrics(run)
    assert m["algorithm"] == "grpo" and m["sft_run"] == str((sft_runs["full"] / "hf").resolve())
    steps = [entry for entry in m["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in steps][-1] == 3
    for component in ("intelligibility", "speaker_similarity", "dnsmos"):
        assert all(0 <= entry[f"rewards/{component}/mean"] <= 1 for entry in steps)
    assert m["invalid_completions"]["scored"] > 0
    assert len(changed_weights(run, sft_runs["full"])) > 10
    assert (run / "checkpoints/checkpoint-3").is_dir()
    assert "resuming from" in rlhf_runs["resumed_log"] and "checkpoint-2" in rlhf_runs["resumed_log"]
    SpeechTokenizer.from_pretrained(run / "hf")  # hf/ carries the tokenizer for synth, eval and export


def test_dpo_ranks_sampled_candidates_and_compares_with_sft(rlhf_runs: dict,
                                                           sft_runs: dict[str, Path]) -> None:
    run = rlhf_runs["dpo"]
    pairs = [json.loads(line) for line in (run / "preferences.jsonl").read_text().splitlines()]
    assert pairs and all(p["reward_chosen"] >= p["reward_rejected"] + 0.001 for p in pairs)
    assert all(p["prompt"].startswith("<|begin_of_text|><|text_start|>") for p in pairs)
    # Chosen is always valid speech; the pairs are the ids the model read (+ eos, as TRL would append it).
    assert all(p["chosen"].endswith("<|speech_end|><|end_of_text|>") for p in pairs)
    tok = SpeechTokenizer.from_pretrained(sft_runs["full"] / "hf")
    assert all(tok.tokenizer.decode(p["chosen_ids"], skip_special_tokens=False) == p["chosen"] for p in pairs)
    m = metrics(run)
    assert m["algorithm"] == "dpo" and m["preference_pairs"] == len(pairs)
    assert len(changed_weights(run, sft_runs["full"])) > 10
    comparison = (run / "eval/comparison.md").read_text()
    assert "| test_seen/sft |" in comparison and "| test_seen/dpo |" in comparison


def test_export_writes_an_artifact_that_loads_and_matches_pytorch(artifact_dir: Path,
                                                                  sft_runs: dict[str, Path]) -> None:
    from voxlm.export.artifact import load_manifest
    from voxlm.export.build import load_artifact

    report = json.loads((artifact_dir / "parity.json").read_text())
    assert report["passed"] and all(check["passed"] for check in report["checks"])
    assert {check["module"] for check in report["checks"]} == {"speechlm", "codec"}
    manifest = load_manifest(artifact_dir)
    assert manifest["device"] == "cpu" and manifest["dtype"] == "float32" and manifest["versions"]["max"]
    assert any(name.startswith("graphs/") and name.endswith(".mef") for name in manifest["files"])
    loaded = load_artifact(artifact_dir)
    reference = AutoModelForCausalLM.from_pretrained(sft_runs["full"] / "hf", local_files_only=True).eval()
    ids = torch.tensor([[loaded.tokenizer.bos_id, loaded.tokenizer.text_start_id, 5, 6, 7]])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    got = loaded.speechlm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-3)


def test_a_tampered_artifact_is_refused(artifact_dir: Path, tmp_path: Path) -> None:
    import shutil

    from voxlm.export.artifact import ArtifactError, load_manifest

    copy = tmp_path / "tampered"
    shutil.copytree(artifact_dir, copy)
    weights = copy / "speechlm/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="speechlm/model.safetensors differs"):
        load_manifest(copy)
    with pytest.raises(ArtifactError, match="exported for device=cpu"):
        load_manifest(artifact_dir, device="gpu")
    older = tmp_path / "older"  # an artifact of an earlier format: its graphs take other inputs
    shutil.copytree(artifact_dir, older)
    manifest = json.loads((older / "manifest.json").read_text())
    (older / "manifest.json").write_text(json.dumps(manifest | {"format": 1}))
    with pytest.raises(ArtifactError, match="artifact format 1, this voxlm reads 2: re-export it"):
        load_manifest(older)


def test_an_artifact_whose_graphs_this_version_no_longer_builds_is_refused(artifact_dir: Path,
                                                                          tmp_path: Path) -> None:
    """An artifact exported by a voxlm that built other graphs (its file hashes intact) is not compiled anew,
    which would serve graphs the parity gate never saw: the error says to export it again, and how."""
    from voxlm.export.artifact import MANIFEST_FILE, ArtifactError
    from voxlm.export.build import load_artifact
    from voxlm.runs import file_digest

    old = tmp_path / "old"
    shutil.copytree(artifact_dir, old)
    graphs = json.loads((old / "graphs/manifest.json").read_text())
    speechlm = next(g for g in graphs["graphs"] if g["name"].startswith("speechlm_"))
    speechlm["key"] = "speechlm_000000000000-000000000000.mef"  # what an older graph builder named
    (old / "graphs/manifest.json").write_text(json.dumps(graphs, indent=2))
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    manifest["files"]["graphs/manifest.json"] = file_digest(old / "graphs/manifest.json")
    (old / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match="holds no graph 'speechlm_.*Export it again .*python export.py"):
        load_artifact(old)


def test_the_parity_gate_catches_a_perturbed_weight(workspace: Path, tiny_corpus: Path,
                                                    sft_runs: dict[str, Path], artifact_dir: Path) -> None:
    out, report = workspace / "artifacts/perturbed", workspace / "parity-report"
    result = export(workspace, tiny_corpus, f"speechlm={sft_runs['full']}", f"out={out}",
                    "parity.perturb=0.01", f"parity.report={report}")
    assert result.returncode == 1
    assert "speechlm logits_max_abs" in result.stderr and "no artifact written" in result.stderr
    assert not out.exists() and not list(out.parent.glob(".perturbed*"))  # not even a partial folder
    # parity.report keeps the measured values of a refused export (how the GPU's bf16 numbers were read)
    measured = json.loads((report / "parity.json").read_text())
    assert measured["complete"] and not measured["passed"]
    logits = next(c for c in measured["checks"] if c["metric"] == "logits_max_abs")
    assert logits["value"] > logits["threshold"] and not logits["passed"]


def test_an_export_for_an_unmeasured_device_and_dtype_is_refused_before_it_loads(workspace: Path,
                                                                                  tiny_corpus: Path) -> None:
    """The gate's thresholds are per device and dtype (configs/export.yaml): a pair with none measured is
    refused at once with what to do, before any model loads or graph compiles."""
    out = workspace / "artifacts/float16"
    result = export(workspace, tiny_corpus, "speechlm=nowhere", "dtype=float16", f"out={out}")
    assert result.returncode == 2
    assert "no parity thresholds for device=cpu dtype=float16" in result.stderr
    assert "device=gpu dtype=float32" in result.stderr and "add it under parity.thresholds" in result.stderr
    assert not out.exists()

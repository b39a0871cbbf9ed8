"""The codec and tokenize stages end to end through the real command line (`python train.py ...`) on the
tiny corpus: run folder contents, resume from the last checkpoint, code shards that match the data, and
the codec evaluation script's report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_config
from datasets import load_from_disk

from voxlm.codec.module import load_codec
from voxlm.data.shards import CodeShards

ROOT = Path(__file__).resolve().parents[1]


def run_cli(script: str, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / script), *overrides], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"{script} {' '.join(overrides)} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def workspace(tiny_corpus: Path) -> Path:
    """The folder that holds data/corpus-tiny; runs/ go beside it."""
    return tiny_corpus.parent.parent


@pytest.fixture(scope="module")
def codec_run(workspace: Path) -> Path:
    run_cli("train.py", "stage=codec", "experiment=tiny", f"paths.root_dir={workspace}",
            "codec.train.max_steps=10", "codec.train.val_check_interval=5")
    return workspace / "runs" / "codec" / "tiny"


@pytest.fixture(scope="module")
def shards_dir(workspace: Path, codec_run: Path) -> Path:
    """The tiny corpus tokenized by the tiny codec (a later run finds the splits complete and skips them)."""
    run_cli("train.py", "stage=tokenize", "experiment=tiny", f"paths.root_dir={workspace}")
    return workspace / "runs" / "tokenize" / "tiny" / "shards"


def test_codec_run_folder(codec_run: Path) -> None:
    for name in ("config.yaml", "metrics.json", "codec.pt", "checkpoints/last.ckpt"):
        assert (codec_run / name).exists(), name
    assert (codec_run.parent / "latest").resolve() == codec_run.resolve()
    metrics = json.loads((codec_run / "metrics.json").read_text())
    assert metrics["global_step"] == 10
    assert math.isfinite(metrics["val/mel_loss"])
    assert list((codec_run / "samples").glob("*.wav")) and list((codec_run / "samples").glob("*.png"))
    codec = load_codec(codec_run)
    assert codec.codebook_size == 64 and codec.sample_rate == 16000


def test_codec_run_resumes_from_last_checkpoint(workspace: Path, codec_run: Path) -> None:
    result = run_cli("train.py", "stage=codec", "experiment=tiny", f"paths.root_dir={workspace}",
                     "codec.train.max_steps=14", "codec.train.val_check_interval=5")
    assert "resuming from" in result.stderr + result.stdout
    metrics = json.loads((codec_run / "metrics.json").read_text())
    assert metrics["global_step"] == 14  # continued from 10, not restarted from 0
    assert (codec_run / "config.yaml.prev").exists()  # the budget changed, the old config is kept


def test_tokenize_writes_shards_matching_the_corpus(workspace: Path, codec_run: Path, shards_dir: Path,
                                                   tiny_corpus: Path) -> None:
    corpus = load_from_disk(str(tiny_corpus))
    codec = load_codec(codec_run)
    for split in ("train", "val", "test_seen", "test_unseen"):
        shards = CodeShards(shards_dir / split)
        assert len(shards) == len(corpus[split])
        assert shards.codebook_size == codec.codebook_size
        by_id = {row["id"]: row for row in corpus[split].remove_columns("audio")}
        for i in range(len(shards)):
            item = shards[i]
            assert item.text == by_id[item.id]["text"] and item.speaker == by_id[item.id]["speaker"]
            assert 0 <= item.codes.min() and item.codes.max() < codec.codebook_size
            # trimming shortens a clip a little; never more than the clip itself
            assert 0 < len(item.codes) <= math.ceil(by_id[item.id]["duration"] * codec.frame_rate)
    # a second run finds every split complete and skips it
    before = (shards_dir / "train/meta.json").stat().st_mtime_ns
    run_cli("train.py", "stage=tokenize", "experiment=tiny", f"paths.root_dir={workspace}")
    assert (shards_dir / "train/meta.json").stat().st_mtime_ns == before
    # a changed codec makes those shards stale: the next run re-encodes them
    saved = torch.load(codec_run / "codec.pt", weights_only=True)
    original = {k: v.clone() for k, v in saved["state_dict"].items()}
    saved["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in original.items()}
    torch.save(saved, codec_run / "codec.pt")
    try:
        run_cli("train.py", "stage=tokenize", "experiment=tiny", f"paths.root_dir={workspace}")
        perturbed = (shards_dir / "train/meta.json").stat().st_mtime_ns
        assert perturbed != before
    finally:
        saved["state_dict"] = original
        torch.save(saved, codec_run / "codec.pt")
    run_cli("train.py", "stage=tokenize", "experiment=tiny", f"paths.root_dir={workspace}")  # codec restored
    assert (shards_dir / "train/meta.json").stat().st_mtime_ns != perturbed


def test_codec_encoding_matches_offline_tokenization(workspace: Path, codec_run: Path,
                                                    shards_dir: Path) -> None:
    """The shards hold what the codec gives for the same (processed) clip encoded on its own."""
    from voxlm.data.dataset import build_dataset

    cfg = train_config("stage=tokenize", "experiment=tiny", f"paths.root_dir={workspace}")
    codec = load_codec(codec_run)
    dataset = build_dataset(cfg.data, "val", sample_rate=codec.sample_rate)
    val_shards = CodeShards(shards_dir / "val")
    shards = {item.id: item for item in (val_shards[i] for i in range(len(val_shards)))}
    utterance = dataset[0]
    codes = codec.encode(torch.from_numpy(utterance.audio)[None])[0].numpy()
    np.testing.assert_array_equal(shards[utterance.id].codes, codes[: len(shards[utterance.id].codes)])


def test_tools_that_read_codes_say_when_the_codec_has_no_ctc_head(codec_run: Path, tmp_path: Path) -> None:
    """The tiny codec trains without its CTC head (loss weight ctc 0); given_timing and best_of_n need it."""
    from voxlm.codec.align import load_ctc_head, require_ctc_head

    assert load_ctc_head(codec_run) is None and load_ctc_head(tmp_path) is None
    with pytest.raises(ValueError, match="has no CTC head .*: the readability rule reads the codes with it"):
        require_ctc_head(codec_run, "the readability rule reads the codes with it")


def test_eval_codec_report(workspace: Path, codec_run: Path) -> None:
    run_cli("scripts/eval_codec.py", "experiment=tiny", f"paths.root_dir={workspace}",
            "eval.max_utterances=2")
    report = json.loads((codec_run / "eval/codec_eval.json").read_text())
    assert set(report["conditions"]) == {"test_seen", "test_unseen", "librivox"}
    librivox = report["conditions"]["librivox"]
    assert librivox["n"] == 5
    assert librivox["wer_original"] < 0.15  # Whisper reads the real human clips (~0.07 measured)
    for condition in report["conditions"].values():
        assert condition["stream_snr_db_min"] >= 30  # streaming decode equals the offline decode
        assert 0 < condition["codebook_share_used"] <= 1 and 0 <= condition["code_repeat"] <= 1
        assert -1 <= condition["stoi"] <= 1
    assert report["bitrate_bps"] == pytest.approx(100 * math.log2(64))
    assert (codec_run / "eval/codec_eval.md").read_text().count("|") > 10
    assert (codec_run / "eval/codec_mels.png").stat().st_size > 10_000


def test_default_wandb_logger_runs_offline(workspace: Path, tiny_corpus: Path) -> None:
    """The default logger: W&B in offline mode, no account or network, media logged into the run folder."""
    run_cli("train.py", "stage=codec", "experiment=tiny", "logger=wandb", "run_name=wandb",
            f"paths.root_dir={workspace}", "codec.train.max_steps=2", "codec.train.val_check_interval=2")
    offline_runs = list((workspace / "runs/codec/wandb/wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list((offline_runs[0] / "files" / "media").rglob("*.wav")), "validation audio reaches W&B"

"""Code shards: round trip through the writer and the memory-mapped reader, shard rotation, and the
errors a user meets when shards are missing or malformed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from voxlm.data.shards import CodeShards, ShardWriter, is_complete


def write_split(split_dir: Path, lengths: list[int], max_codes_per_shard: int = 1 << 20) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    writer = ShardWriter(split_dir, max_codes_per_shard=max_codes_per_shard)
    arrays = []
    for i, n in enumerate(lengths):
        codes = rng.integers(0, 1000, size=n)
        arrays.append(codes)
        writer.add(f"utt{i}", codes, text=f"sentence {i}", speaker=f"spk{i % 2}", duration=n / 50)
    writer.close({"codebook_size": 1000, "frame_rate": 50.0, "sample_rate": 16000})
    return arrays


def test_round_trip_with_shard_rotation(tmp_path: Path) -> None:
    lengths = [30, 70, 5, 64, 1, 90]
    arrays = write_split(tmp_path / "train", lengths, max_codes_per_shard=100)
    shards = CodeShards(tmp_path / "train")
    assert len(shards) == len(lengths)
    assert shards.meta["num_shards"] > 1, "a 100-code cap must rotate files"
    assert all(path.stat().st_size <= 100 * 4 for path in (tmp_path / "train").glob("codes-*.bin"))
    for i, expected in enumerate(arrays):
        item = shards[i]
        np.testing.assert_array_equal(item.codes, expected)
        assert item.codes.dtype == np.int32
        assert item.text == f"sentence {i}" and item.speaker == f"spk{i % 2}"
    assert shards.codebook_size == 1000 and shards.frame_rate == 50.0
    assert shards.speakers() == ["spk0", "spk1"]
    assert shards.meta["num_codes"] == sum(lengths)


def test_incomplete_split_is_reported(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "val")
    writer.add("a", np.arange(4), "t", "s", 0.1)
    assert not is_complete(tmp_path / "val")
    with pytest.raises(FileNotFoundError, match="stage=tokenize"):
        CodeShards(tmp_path / "val")


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "train")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        writer.add("a", np.zeros((2, 3)), "t", "s", 0.1)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        writer.add("a", np.zeros(0), "t", "s", 0.1)
    writer.add("a", np.arange(3), "t", "s", 0.1)
    with pytest.raises(ValueError, match="twice"):
        writer.add("a", np.arange(3), "t", "s", 0.1)


def test_rewriting_a_split_removes_stale_files(tmp_path: Path) -> None:
    write_split(tmp_path / "train", [50] * 6, max_codes_per_shard=100)
    write_split(tmp_path / "train", [10, 10])
    assert len(list((tmp_path / "train").glob("codes-*.bin"))) == 1
    assert len(CodeShards(tmp_path / "train")) == 2

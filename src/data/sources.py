"""Where utterances come from: the project's corpus, any Hugging Face audio dataset, or a JSONL manifest.

`open_source(data_cfg, split)` turns one split of any of them into the same `Source`: parallel lists of ids,
texts, speakers and durations (None where the source has none) plus `audio[i]`, which gives row i's audio
as a file path or as encoded bytes without decoding it. Column/key names and split names come from the
config (data.columns, data.splits); everything after this point (voxlm.data.dataset) is source-agnostic.

    corpus    a DatasetDict written by scripts/build_corpus.py with save_to_disk
    hf        a local save_to_disk folder, a folder of parquet/arrow/... files (datasets.load_dataset), or a
              hub dataset by name (data.name, data.subset) where the network allows
    manifest  a folder of JSONL files, one per split, one utterance per line; audio paths are relative to
              the manifest file's folder or absolute
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig

from voxlm.data.audio import AudioError, AudioSource

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test_seen", "test_unseen")
SOURCES = ("corpus", "hf", "manifest")
# Used when data.columns.speaker is null: single-speaker datasets need no speaker column.
UNKNOWN_SPEAKER = "unknown"


class FileAudio:
    """Audio stored as files: item i is a path."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> AudioSource:
        return self.paths[i]



class HFAudio:
    """Audio in a Hugging Face dataset column, left undecoded (datasets would need torchcodec to decode it).

    An item is the embedded bytes, or the file path when the dataset only references files.
    """

    def __init__(self, table: datasets.Dataset, column: str, root: Path | None) -> None:
        if isinstance(table.features[column], datasets.Audio):
            table = table.cast_column(column, datasets.Audio(decode=False))
        self.table = table.select_columns([column])
        self.column = column
        self.root = root

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> AudioSource:
        return self._audio(self.table[i][self.column])

    def _audio(self, value: Any) -> AudioSource:
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, bytes):
            return value
        if not value:
            raise AudioError("missing", "the audio column holds neither bytes nor a path")
        path = Path(value)
        if not path.is_absolute() and self.root is not None and (self.root / path).exists():
            path = self.root / path
        return path


@dataclass
class Source:
    origin: str                     # what was opened, for messages: "manifest /data/x/train.jsonl"
    ids: list[str]
    texts: list[str | None]
    speakers: list[str]
    durations: list[float | None]
    audio: FileAudio | HFAudio
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) of rows not indexable

    def __len__(self) -> int:
        return len(self.ids)


def open_source(data_cfg: DictConfig, split: str) -> Source:
    """One split of the source named by data_cfg.source, with its columns and split name mapped."""
    kind = data_cfg.source
    if kind not in SOURCES:
        raise ValueError(f"data.source={kind!r} is not a source: use one of {', '.join(SOURCES)}")
    splits = data_cfg.splits
    if split not in splits:
        raise ValueError(f"split {split!r} is not in data.splits (it has {', '.join(splits)})")
    source_split = splits[split]
    if source_split is None:
        raise ValueError(f"data.splits.{split} is null: this source has no {split} split; map it to one")
    columns = data_cfg.columns
    for name in ("audio", "text"):
        if columns.get(name) is None:
            raise ValueError(f"data.columns.{name} must name the source's {name} column (or manifest key)")
    if kind == "manifest":
        return open_manifest(_manifest_path(data_cfg.path, source_split), columns)
    table, root = _open_hf_split(data_cfg, str(source_split))
    return hf_source(table, columns, origin=f"{kind} {data_cfg.name or data_cfg.path} [{source_split}]",
                     id_prefix=str(source_split), root=root)


def _open_hf_split(data_cfg: DictConfig, split: str) -> tuple[datasets.Dataset, Path | None]:
    cache_dir = data_cfg.get("cache_dir")
    if data_cfg.source == "hf" and data_cfg.get("name"):
        table = datasets.load_dataset(data_cfg.name, data_cfg.get("subset"), split=split, cache_dir=cache_dir)
        return table, None
    if data_cfg.path is None:
        raise ValueError("data.path is null: point it at a dataset folder (or set data.name, a hub dataset)")
    root = Path(data_cfg.path)
    if not root.exists():
        hint = ("build it with `python scripts/build_corpus.py` (make corpus) or point data.path at one"
                if data_cfg.source == "corpus" else "point data.path at a dataset folder")
        raise FileNotFoundError(f"no dataset at data.path={root}: {hint}")
    if (root / "dataset_dict.json").exists():
        splits = datasets.load_from_disk(str(root))
        if split not in splits:
            raise ValueError(f"{root} has no split {split!r} (it has {', '.join(splits)}): fix data.splits")
        return splits[split], root
    if (root / "state.json").exists():
        raise ValueError(f"{root} holds one Dataset saved with save_to_disk; save a DatasetDict with named "
                         "splits instead (DatasetDict({'train': dataset}).save_to_disk(...))")
    if data_cfg.source == "corpus":
        raise ValueError(f"{root} is not a corpus (no dataset_dict.json from save_to_disk); "
                         "for other Hugging Face data use data=hf")
    return datasets.load_dataset(str(root), data_cfg.get("subset"), split=split, cache_dir=cache_dir), root


def hf_source(table: datasets.Dataset, columns: DictConfig, origin: str, id_prefix: str,
              root: Path | None = None) -> Source:
    """A Source over a Hugging Face dataset; id and duration columns are used when the dataset has them."""
    present = set(table.column_names)
    for field_name in ("audio", "text", "speaker"):
        column = columns.get(field_name)
        if column is not None and column not in present:
            raise ValueError(f"{origin} has no column {column!r} (data.columns.{field_name}); "
                             f"its columns are {sorted(present)}")

    def column_values(field_name: str) -> list | None:
        column = columns.get(field_name)
        return list(table[column]) if column is not None and column in present else None

    n = len(table)
    ids = column_values("id") or [f"{id_prefix}-{row:07d}" for row in range(n)]
    speakers = column_values("speaker") or [UNKNOWN_SPEAKER] * n
    durations = column_values("duration") or [None] * n
    return Source(
        origin=origin,
        ids=[str(i) for i in ids],
        texts=column_values("text"),
        speakers=[str(s) for s in speakers],
        durations=[None if d is None else float(d) for d in durations],
        audio=HFAudio(table, columns.audio, root),
    )


def _manifest_path(folder: str | Path | None, name: str) -> Path:
    if folder is None:
        raise ValueError("data.path is null: point it at the folder holding the manifest files")
    path = Path(folder) / name  # an absolute split name stays absolute
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}: data.path names the folder, data.splits its files")
    return path


def open_manifest(path: str | Path, columns: DictConfig) -> Source:
    """A Source over a JSONL manifest; a line that is not a usable JSON object is rejected, not fatal."""
    path = Path(path)
    ids, texts, speakers, durations, paths, rejected = [], [], [], [], [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = _manifest_row(json.loads(line), columns)
            except (json.JSONDecodeError, ValueError) as error:
                rejected.append(("bad line", f"{path}:{number}: {error}"))
                continue
            audio = Path(row["audio"])
            ids.append(row["id"] or audio.with_suffix("").as_posix())
            texts.append(row["text"])
            speakers.append(row["speaker"])
            durations.append(row["duration"])
            paths.append(audio if audio.is_absolute() else path.parent / audio)
    return Source(f"manifest {path}", ids, texts, speakers, durations, FileAudio(paths), rejected)


def _manifest_row(row: Any, columns: DictConfig) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    required = [name for name in ("audio", "text", "speaker") if columns.get(name) is not None]
    missing = [columns[name] for name in required if columns[name] not in row]
    if missing:
        raise ValueError(f"no key {', '.join(map(repr, missing))} (data.columns); keys are {sorted(row)}")
    if not isinstance(row[columns.audio], str):
        raise ValueError(f"{columns.audio!r} must be a path string, got {row[columns.audio]!r}")

    def optional(name: str) -> Any:
        key = columns.get(name)
        return row.get(key) if key is not None else None

    duration = optional("duration")
    return {
        "audio": row[columns.audio],
        "text": row[columns.text],
        "speaker": str(row[columns.speaker]) if columns.get("speaker") is not None else UNKNOWN_SPEAKER,
        "id": None if optional("id") is None else str(optional("id")),
        "duration": None if duration is None else float(duration),
    }

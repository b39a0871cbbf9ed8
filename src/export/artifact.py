"""The export artifact: one folder that a server loads without PyTorch training code or a graph compile.

    <artifact>/manifest.json   versions (voxlm, MAX, torch), device, dtype, sample and code rates, vocabulary
                               layout, a hash of each file and one key over config + weights (`key`)
               speechlm/       the SpeechLM in Hugging Face format (config, safetensors, tokenizer)
               codec/codec.pt  the codec generator + its config
               voices/         saved voices (voice.json + codes.npy + reference.wav each), when any exist
               graphs/         precompiled MAX graphs (.mef) for this device, keyed by `key`
               parity.json     the parity report that admitted the artifact (and parity.md, readable)

`write_artifact` builds the folder under a temporary name and renames it into place only at the end, so a
failed export leaves nothing at `out`. `load_manifest` re-hashes every file and refuses an artifact whose
files differ from what the manifest recorded, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from voxlm.runs import file_digest

MANIFEST_FILE = "manifest.json"
# 2: the SpeechLM graphs' sampler takes five int parameters (<|advance|> added): version-1 graphs do not load.
FORMAT_VERSION = 2


class ArtifactError(Exception):
    """An artifact that cannot be loaded as it is: missing, tampered with, or built for something else."""


def hash_files(root: Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, str]:
    """sha256 of every file under root, by relative path (sorted, so the mapping is deterministic)."""
    return {str(path.relative_to(root)): file_digest(path) for path in sorted(root.rglob("*"))
            if path.is_file() and str(path.relative_to(root)) not in exclude}


def content_key(files: dict[str, str], prefixes: tuple[str, ...] = ("speechlm/", "codec/")) -> str:
    """One hash over the model files (config + weights + tokenizer): what the compiled graphs depend on."""
    digest = hashlib.sha256()
    for name, value in sorted(files.items()):
        if name.startswith(prefixes):
            digest.update(f"{name}\0{value}\n".encode())
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    found = {}
    for package in ("voxlm", "max", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_artifact(out: Path, fill: Callable[[Path], dict[str, Any]]) -> Path:
    """Build an artifact: `fill(tmp_dir)` writes the files and returns the manifest's descriptive fields;
    the hashes are added here and the folder is renamed to `out` (replacing an older artifact there) only
    when everything succeeded. Any exception leaves `out` as it was."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fields = fill(tmp)
        files = hash_files(tmp)
        manifest = {"format": FORMAT_VERSION, "versions": versions(), **fields, "key": content_key(files),
                    "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_manifest(folder: Path, device: str | None = None, verify: bool = True) -> dict[str, Any]:
    """The manifest of an artifact, after checking every file against its recorded hash (and, if given,
    that it was built for `device`)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an export artifact (no {MANIFEST_FILE}): build one with "
                            "`python export.py out=<dir>`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}: artifact format {manifest.get('format')}, this voxlm reads "
                            f"{FORMAT_VERSION}: re-export it")
    if device is not None and manifest.get("device") != device:
        raise ArtifactError(f"{folder} was exported for device={manifest.get('device')}, not {device}: "
                            f"re-export with `python export.py device={device}`")
    if verify:
        recorded, found = manifest["files"], hash_files(folder)
        for name in sorted(set(recorded) | set(found)):
            if recorded.get(name) != found.get(name):
                state = ("is missing" if name not in found else "was added" if name not in recorded
                         else "differs from the manifest's hash")
                raise ArtifactError(f"{folder}: {name} {state}; the artifact was changed after export: "
                                    "re-export it")
        if content_key(found) != manifest["key"]:
            raise ArtifactError(f"{folder}: the model files do not match the manifest key: re-export it")
    return manifest

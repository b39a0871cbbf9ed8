"""MAX inference sessions shared by every exported graph in a process, and where compiled graphs go.

Compiling a graph costs 1-3 min on 2 CPU cores, so each graph is compiled once per process
(`compile_once`). An export writes every graph it compiles into the artifact (`use_mefs(export_to=...)`);
a server reads them back (`use_mefs(precompiled=...)`) and starts without compiling. MAX matches a
precompiled graph by name and signature only, which is why the artifact keys its graphs by a hash of the
model files (voxlm.export.artifact) rather than trusting the match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from pathlib import Path

from max.driver import CPU, Accelerator, Device
from max.engine import CompiledModel, InferenceSession
from max.graph import DeviceRef, Graph

log = logging.getLogger(__name__)
_SESSIONS: dict[str, InferenceSession] = {}
_COMPILED: dict[Hashable, CompiledModel] = {}
_MEFS: dict[str, Path | None] = {"export_to": None, "precompiled": None}


def max_device(name: str) -> Device:
    """The MAX device for "cpu" or "gpu"."""
    if name not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, got {name!r}")
    return CPU() if name == "cpu" else Accelerator()


def device_ref(name: str) -> DeviceRef:
    """The graph-side device for "cpu" or "gpu"."""
    max_device(name)  # the same check and message
    return DeviceRef.CPU() if name == "cpu" else DeviceRef.GPU()


def use_mefs(export_to: str | Path | None = None, precompiled: str | Path | None = None) -> None:
    """From now on, write compiled graphs to `export_to`, or read them from `precompiled` (not both).
    Sessions and compiled graphs made before are dropped, so the next compile goes through the new store."""
    if export_to is not None and precompiled is not None:
        raise ValueError("either export compiled graphs or read precompiled ones, not both")
    _MEFS.update(export_to=Path(export_to) if export_to else None,
                 precompiled=Path(precompiled) if precompiled else None)
    _SESSIONS.clear()
    _COMPILED.clear()


def session(device: str = "cpu") -> InferenceSession:
    if device not in _SESSIONS:
        _SESSIONS[device] = InferenceSession(devices=[max_device(device)],
                                             export_mefs=_MEFS["export_to"],
                                             precompiled_mefs=_MEFS["precompiled"])
    return _SESSIONS[device]


def compile_once(key: Hashable, device: str, build: Callable[[], Graph]) -> tuple[InferenceSession,
                                                                                   CompiledModel]:
    """(session, compiled graph) for `key`, building and compiling the graph only the first time."""
    current = session(device)
    full_key = (key, device)
    if full_key not in _COMPILED:
        graph = build()
        # Logged because a cold compile is most of an export's time (minutes; on a GPU too), and a run cut
        # short by a time limit should still say which graph it was compiling and how long the others took.
        log.info("compiling %s for %s", graph.name, device)
        started = time.perf_counter()
        # compile_reusing_mefs, not compile: only it writes to or reads from the session's MEF store.
        _COMPILED[full_key] = current.compile_reusing_mefs(graph)
        log.info("compiled %s for %s in %.1f s", graph.name, device, time.perf_counter() - started)
    return current, _COMPILED[full_key]

"""A server from serve.yaml: load the backend, start the engine, build the app, run uvicorn.

`build_server(cfg)` is what serve.py runs and what the tests start on a free port, in-process.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI
from omegaconf import DictConfig, OmegaConf

from voxlm.serve.app import ApiSettings, create_app
from voxlm.serve.backends import Backend, max_backend, torch_backend
from voxlm.serve.engine import Engine, EngineConfig
from voxlm.serve.metrics import ServeMetrics
from voxlm.speechlm.generate import SamplingConfig
from voxlm.speechlm.model import speechlm_codec

log = logging.getLogger("voxlm.serve")


class ServeConfigError(Exception):
    """serve.yaml names no model, or the wrong kind for its backend."""


@dataclass
class Server:
    app: FastAPI
    engine: Engine
    backend: Backend
    metrics: ServeMetrics


def load_backend(cfg: DictConfig) -> Backend:
    if cfg.backend == "max":
        if not cfg.artifact:
            raise ServeConfigError("backend=max serves an export artifact: pass artifact=<dir> (written by "
                                   "python export.py), or backend=torch checkpoint=<run>")
        # torch only does the engine's glue next to MAX (masks, one uniform draw per step): its thread
        # pool spinning after each small op took CPU from MAX's (~10 ms of a ~60 ms time to first audio on
        # the 2-core dev box; docs/benchmarks.md).
        torch.set_num_threads(1)
        return max_backend(cfg.artifact, cfg.device, cfg.api.voices_dir, cfg.model_id)
    if cfg.backend == "torch":
        if not cfg.checkpoint:
            raise ServeConfigError("backend=torch serves checkpoints: pass checkpoint=<speechlm run> "
                                   "(and codec=<codec run>)")
        codec = speechlm_codec(cfg.checkpoint, cfg.codec, "runs/codec/latest")
        return torch_backend(cfg.checkpoint, codec, cfg.device, cfg.dtype, cfg.api.voices_dir,
                             cfg.model_id)
    raise ServeConfigError(f"backend must be max or torch, got {cfg.backend!r}")


def build_server(cfg: DictConfig) -> Server:
    """The backend, a started engine (warmed up when cfg.warmup) and the app that stops it on shutdown."""
    backend = load_backend(cfg)
    metrics = ServeMetrics(backend.name)
    plain = OmegaConf.to_container(cfg, resolve=True)
    engine_cfg = dict(plain["engine"], chunk_frames=tuple(plain["engine"]["chunk_frames"]))
    engine = Engine(backend, EngineConfig(**engine_cfg), SamplingConfig(**plain["sampling"]), metrics)
    if cfg.warmup:
        engine.warmup()
    engine.start()
    Path(cfg.api.voices_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(backend, engine, ApiSettings(**plain["api"]), metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.stop()

    app.router.lifespan_context = lifespan
    return Server(app, engine, backend, metrics)

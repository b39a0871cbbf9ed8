"""Serve streaming speech over HTTP (OpenAI-compatible `POST /v1/audio/speech`, a web page at /):

    python serve.py artifact=artifacts/quickstart                 # MAX: an artifact from `python export.py`
    python serve.py backend=torch checkpoint=runs/rlhf/quickstart codec=runs/codec/quickstart   # PyTorch
    [host=127.0.0.1] [port=8000] [api.api_key=...] [engine.max_active_streams=16] ...   (configs/serve.yaml)

Then: curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \\
        -d '{"model": "tts-1", "input": "Hello there.", "voice": "<a voice from /v1/voices>"}' > hello.wav
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import uvicorn
from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from voxlm.export.artifact import ArtifactError
from voxlm.serve.server import ServeConfigError, build_server

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "serve.yaml"
# Stored under a name (as synth.py does): `codec=...` must not select train.py's config group of that name.
ConfigStore.instance().store(name="serve", node=OmegaConf.load(CONFIG_FILE))


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/serve.yaml with command-line style overrides (for scripts and tests)."""
    with initialize(version_base="1.3", config_path=None):
        return compose("serve", overrides=overrides)


@hydra.main(version_base="1.3", config_path=None, config_name="serve")
def main(cfg: DictConfig) -> None:
    try:
        server = build_server(cfg)
    except (ServeConfigError, ArtifactError, FileNotFoundError, ValueError) as error:
        print(f"serve.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    voices = ", ".join(server.app.state.voices.names()) if hasattr(server.app.state, "voices") else ""
    print(f"voxlm: {server.backend.name} backend, model {server.backend.model_id}; "
          f"http://{cfg.host}:{cfg.port}/ (voices: {voices or 'none: POST /v1/voices'})", flush=True)
    # uvloop + httptools (the serve extra installs them): the pure-Python loop and h11 parser cost several ms
    # of every stream's time to first audio.
    uvicorn.run(server.app, host=cfg.host, port=cfg.port, log_level="warning", loop="uvloop",
                http="httptools")


if __name__ == "__main__":
    main()

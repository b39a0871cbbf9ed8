"""voxlm: training-to-serving framework for speech-language-model text-to-speech."""

__version__ = "0.1.0"

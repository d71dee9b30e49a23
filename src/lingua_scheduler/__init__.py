"""lingua-scheduler: central scheduler of a distributed real-time speech-translation platform."""

__version__ = "0.1.0"

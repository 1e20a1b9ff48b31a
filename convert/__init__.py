"""Checkpoint converter: release `.pth` <-> native `.safetensors` (see `python -m convert --help`)."""

from convert.cli import main

__all__ = ["main"]

"""Test-only helpers: the Kong Admin API double, a PDK probe plugin, an RPC relay."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

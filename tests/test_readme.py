"""The README's Python examples run as written (the torch one only where torch is installed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


def test_readme_examples_run():
    namespace: dict = {}
    for block in BLOCKS:
        if "import torch" in block and importlib.util.find_spec("torch") is None:
            continue
        exec(compile(block, str(README), "exec"), namespace)
    assert "lstm" in namespace


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_readme_torch_example_round_trips_weights():
    namespace: dict = {}
    for block in BLOCKS:
        exec(compile(block, str(README), "exec"), namespace)
    torch_lstm, lstm = namespace["torch_lstm"], namespace["lstm"]
    for name, value in torch_lstm.state_dict().items():
        assert (value.numpy() == lstm.state_dict()[name]).all()

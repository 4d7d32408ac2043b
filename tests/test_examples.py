"""The examples in examples/ run, learn their toy tasks, and are deterministic with their seed."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

import fastrnn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["many_to_one", "many_to_many", "one_to_many"]


@pytest.fixture(autouse=True)
def one_thread():
    # These layers are tiny and the tests check learning, not threading: one thread keeps their
    # time independent of how busy the machine's other cores are.
    threads = fastrnn.get_num_threads()
    fastrnn.set_num_threads(1)
    yield
    fastrnn.set_num_threads(threads)


def load_main(name: str):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]


def test_many_to_one_classifier_learns():
    metrics = load_main("many_to_one")(steps=100, seed=0)
    assert metrics["final_loss"] < 0.5 * metrics["initial_loss"]
    assert metrics["final_accuracy"] > 0.85  # chance is about 0.5


def test_many_to_many_tagger_learns():
    metrics = load_main("many_to_many")(steps=100, seed=0)
    assert metrics["final_loss"] < 0.5 * metrics["initial_loss"]
    assert metrics["final_accuracy"] > 0.85  # per step; chance is 0.5


def test_one_to_many_generator_learns():
    metrics = load_main("one_to_many")(steps=150, seed=0)
    assert metrics["final_loss"] < 0.1 * metrics["first_loss"]
    # Free-running generation for 3x the training length; emitting zeros would score 0.5.
    assert metrics["final_mse"] < 0.1 * metrics["initial_mse"]


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_deterministic(name):
    main = load_main(name)
    assert main(steps=5, seed=1) == main(steps=5, seed=1)
    assert main(steps=5, seed=1) != main(steps=5, seed=2)


@pytest.mark.parametrize("name", NAMES)
def test_examples_run_as_scripts(name, capsys):
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "step" in printed
    assert "final_loss" in printed

"""The measured effect (issue 4): training on the loop's trajectories moves the model toward
the loop's preference on held-out prompts and seeds, with no loop at inference.

One study on the tiny stack (tiny-sd-fit, 8 darkness-judged sessions, ~5 min): the loop
darkens, and base + LoRA is scored against the base on 6 held-out prompts x 3 seeds (18 paired
cells). bench/measured_effect.py prints the same figures for several training seeds.
"""

from __future__ import annotations

import math

import pytest
from artloop.trainers.effect import EffectStudy, run_study


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return run_study(EffectStudy(work_dir=tmp_path_factory.mktemp("effect")))


def _margin(f: dict) -> float:
    """Three standard errors of the paired mean change: what noise could explain."""
    return 3 * f["std_change"] / math.sqrt(f["cells"])


def test_the_loop_darkens(figures):
    assert min(figures["loop_gains"]) > 0.1


def test_sft_carries_at_least_half_the_loop_gain(figures):
    assert figures["sft"]["share_of_loop_gain"] >= 0.5


@pytest.mark.parametrize("trainer", ["dpo", "ddpo"])
def test_preference_trainers_move_toward_darker(figures, trainer):
    change = figures[trainer]["mean_change"]
    assert change > 0.005 and change > _margin(figures[trainer]), figures[trainer]

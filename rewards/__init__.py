"""Rewards and judges by name, one signature: fn(images, prompts, metadata) -> (scores, info).

registry.py holds the registry (`@reward("name", range=(lo, hi))`, `get_reward`, `judge_reward`);
metrics.py the measured image statistics ("brightness", "darkness", "contrast", "saturation",
"sharpness", "colourfulness"); vlm.py the VLM judges ("vlm", "synartifact") and the check that
refuses a constant judge; judge.py a reward as the loop's judge. Importing this package
registers the built-ins.
"""

from artloop.rewards import metrics as metrics  # registers the image statistics
from artloop.rewards.judge import judge_by_reward
from artloop.rewards.registry import (
    REWARDS,
    Reward,
    RewardFn,
    get_reward,
    judge_reward,
    reward,
    reward_entry,
)
from artloop.rewards.vlm import (
    BrokenJudgeError,
    JudgeWatch,
    check_judge,
    clip_text_embedder,
    synartifact_reward,
    vlm_reward,
)

__all__ = [
    "REWARDS",
    "BrokenJudgeError",
    "JudgeWatch",
    "Reward",
    "RewardFn",
    "check_judge",
    "clip_text_embedder",
    "get_reward",
    "judge_by_reward",
    "judge_reward",
    "reward",
    "reward_entry",
    "synartifact_reward",
    "vlm_reward",
]

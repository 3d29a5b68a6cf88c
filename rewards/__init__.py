"""Rewards and judges by name, one signature: fn(images, prompts, metadata) -> (scores, info).

registry.py holds the registry (`@reward("name", range=(lo, hi), model=...)`, `get_reward`,
`reward_entry`, `judge_reward`; `package.module:function`, `scorers.plugins` and the entry-point
group `artloop.rewards` for third-party scorers; `scorer_device`, `scorer_model` and
`scorers_config` for the scorers that load a model); composite.py the composites
(`composite:agfsync`, `composite:a=0.6,b=0.4`); metrics.py the measured image statistics
("brightness", "darkness", "contrast", "saturation", "sharpness", "colourfulness"); clip.py
(clip, pickscore, aesthetic), hps.py (hpsv2), imagereward.py and vqa.py the field's scorers; shapes.py the shapes world's
exact judge ("shapes"); vlm.py the
VLM judges ("vlm", "synartifact") and the canary check that refuses a judge that cannot tell
control images from real ones; judge.py a reward as the loop's judge. Importing this package registers the built-ins.
"""

# Importing these registers the built-in scorers (each loads its model on first use only).
from artloop.rewards import clip as clip
from artloop.rewards import hps as hps
from artloop.rewards import imagereward as imagereward
from artloop.rewards import metrics as metrics
from artloop.rewards import shapes as shapes
from artloop.rewards import vqa as vqa
from artloop.rewards.composite import (
    AGFSYNC,
    AGFSYNC_PAPER,
    AGFSYNC_VQA,
    PRESETS,
    Composite,
    composite_weights,
)
from artloop.rewards.judge import judge_alone_by_reward, judge_by_reward, verdict_alone
from artloop.rewards.registry import (
    ENTRY_POINT_GROUP,
    REWARDS,
    Reward,
    RewardFn,
    UnknownRewardError,
    available,
    configure_scorers,
    get_reward,
    judge_reward,
    reward,
    reward_entry,
    scorer_device,
    scorer_model,
    scorers_chat_config,
    scorers_config,
    split_names,
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
    "AGFSYNC",
    "AGFSYNC_PAPER",
    "AGFSYNC_VQA",
    "ENTRY_POINT_GROUP",
    "PRESETS",
    "REWARDS",
    "BrokenJudgeError",
    "Composite",
    "JudgeWatch",
    "Reward",
    "RewardFn",
    "UnknownRewardError",
    "available",
    "check_judge",
    "clip_text_embedder",
    "composite_weights",
    "configure_scorers",
    "get_reward",
    "judge_alone_by_reward",
    "judge_by_reward",
    "judge_reward",
    "reward",
    "reward_entry",
    "scorer_device",
    "scorer_model",
    "scorers_chat_config",
    "scorers_config",
    "split_names",
    "synartifact_reward",
    "verdict_alone",
    "vlm_reward",
]

"""Rewards: the seam (base), a rule reward, the Whisper CER + NLL reward, speaker similarity, duration, and
CompositeReward, which combines several."""

from .base import OK, Reward, RewardBase, RewardResult, SpeechSample

__all__ = ["OK", "Reward", "RewardBase", "RewardResult", "SpeechSample"]

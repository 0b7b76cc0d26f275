"""Rewards: the seam (base), a rule reward, and the Whisper CER + NLL reward."""

from .base import OK, Reward, RewardResult, SpeechSample

__all__ = ["OK", "Reward", "RewardResult", "SpeechSample"]

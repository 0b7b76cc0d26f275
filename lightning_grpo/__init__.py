"""lightning_grpo: GRPO fine-tuning of LLaSA text-to-speech models with a Whisper reward, in PyTorch Lightning."""

__version__ = "0.1.0"

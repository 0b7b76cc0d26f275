"""lightning_grpo: GRPO fine-tuning of LLaSA text-to-speech models with a Whisper reward, in PyTorch Lightning."""

import logging as _logging

# torchao (a need of X-codec2's decoder) logs, on every import, that its CUDA-only kernels do not load on
# CPU builds, and torch logs a deprecation for torchao's enums; neither affects anything here.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

__version__ = "0.1.0"

"""A small world where GRPO with the real Whisper reward can be run and measured on a CPU.

`unit_codec`: a codec whose codes are words of real (espeak-ng) speech, behind the SpeechDecoder seam;
`warm_start`: a tiny LLaSA-shaped policy taught by teacher forcing to speak those codes, partly right.
"""

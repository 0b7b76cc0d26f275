"""Reference audio a scoring request may carry, checked before any reward sees it.

A client of the scoring server (reward/server.py) gives a voice-cloning sample's reference voice in one of three
ways, and never as a path on the server's file system unless the operator allows one:

    prompt_codes   the reference's codec codes (the reward decodes them)
    prompt_audio   the recording itself: base64 of a WAV / FLAC / OGG file, at most --max-reference-seconds
    prompt_wav     a file name under the directory the operator started the server with (--reference-dir);
                   resolved with symlinks and `..` followed, `~` taken literally, and refused unless the real
                   path lies inside that directory

Every refusal of a `prompt_wav` reads the same whether the file is outside the directory, missing, unreadable or
not audio, so the server answers no question about its file system. Uploaded recordings are written, named by
the hash of their content, into a private temporary directory, so a reward reads them as it reads a data row's
recording (and caches their embeddings across requests); each file is removed when no request in flight uses it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Iterable

from ..llasa import TOKENS_PER_SECOND
from .audio import MAX_REFERENCE_SECONDS

DEFAULT_MAX_REFERENCE_SECONDS = MAX_REFERENCE_SECONDS
DEFAULT_MAX_REQUEST_REFERENCE_SECONDS = 600.0  # e.g. 20 distinct 30 s references in one body


class ReferenceRejected(ValueError):
    """A reference a request may not use; `status` is the HTTP status to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def codes_seconds(codes: Iterable[int] | None) -> float:
    return len(list(codes or [])) / TOKENS_PER_SECOND


class RequestReferences:
    """Checks the reference fields of samples and owns the uploaded recordings (module docstring).

    Args:
        reference_dir: the only directory `prompt_wav` may name a file in (None: no paths accepted).
        max_reference_seconds: longest reference (recording or codes) of one sample.
    """

    def __init__(self, reference_dir: str | Path | None = None,
                 max_reference_seconds: float = DEFAULT_MAX_REFERENCE_SECONDS) -> None:
        if not 0 < max_reference_seconds <= MAX_REFERENCE_SECONDS:  # the rewards read no longer recording
            raise ValueError(f"--max-reference-seconds={max_reference_seconds} must be in (0, {MAX_REFERENCE_SECONDS:g}]")
        self.max_reference_seconds = max_reference_seconds
        self.reference_dir: Path | None = None
        if reference_dir is not None:
            real = Path(os.path.realpath(reference_dir))
            if not real.is_dir():
                raise ValueError(f"--reference-dir {reference_dir} is not a directory; name the directory that holds the reference recordings")
            self.reference_dir = real
        self._uploads: Path | None = None  # made at the first upload
        self._users: Counter[str] = Counter()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ checks

    def check_codes(self, codes: list[int] | None, where: str) -> None:
        seconds = codes_seconds(codes)
        if seconds > self.max_reference_seconds:
            raise ReferenceRejected(
                413, f"{where}prompt_codes has {len(codes or [])} codes ({seconds:.1f} s), more than "
                f"--max-reference-seconds={self.max_reference_seconds:g}; send a shorter reference clip"
            )

    def resolve_path(self, name: str, where: str) -> tuple[str, float]:
        """The real path of `name` inside the reference directory and its duration in seconds, or
        ReferenceRejected (one message for every cause)."""
        refused = ReferenceRejected(
            422, f"{where}prompt_wav {name!r} is not a readable recording under this server's --reference-dir; send "
            "the recording in prompt_audio (base64 WAV) or its codes in prompt_codes"
        )
        if self.reference_dir is None:
            raise ReferenceRejected(
                422, f"{where}prompt_wav: this server reads no files for clients (it was started without "
                "--reference-dir); send the recording in prompt_audio (base64 WAV) or its codes in prompt_codes"
            )
        if not name or "\x00" in name:
            raise refused
        real = Path(os.path.realpath(self.reference_dir / name))  # an absolute `name` replaces the directory
        if not real.is_relative_to(self.reference_dir) or not real.is_file():
            raise refused
        import soundfile as sf

        try:
            info = sf.info(str(real))
        except Exception:  # soundfile's message says whether the file is audio: not the client's business
            raise refused from None
        seconds = info.frames / info.samplerate
        self._check_seconds(seconds, f"{where}prompt_wav {name!r}")
        return str(real), seconds

    def _check_seconds(self, seconds: float, what: str) -> None:
        if seconds > self.max_reference_seconds:
            raise ReferenceRejected(
                413, f"{what} is {seconds:.1f} s long, more than --max-reference-seconds="
                f"{self.max_reference_seconds:g}; send a shorter reference clip"
            )

    # ----------------------------------------------------------------------------------------- uploads

    def store_upload(self, encoded: str, where: str) -> tuple[str, float]:
        """Decode a base64 recording, check it, and return the path of its stored copy (held until `release`)
        and its duration in seconds."""
        import soundfile as sf

        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ReferenceRejected(422, f"{where}prompt_audio is not base64; send base64 of a WAV file's bytes") from None
        try:
            info = sf.info(io.BytesIO(raw))
            self._check_seconds(info.frames / info.samplerate, f"{where}prompt_audio")
            data, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)  # (samples, channels)
        except ReferenceRejected:
            raise
        except Exception as e:
            raise ReferenceRejected(
                422, f"{where}prompt_audio is not a WAV, FLAC or OGG file soundfile reads ({type(e).__name__}); "
                "send base64 of the file's bytes"
            ) from None
        digest = hashlib.sha256(data.tobytes() + str(rate).encode()).hexdigest()[:32]
        with self._lock:
            if self._uploads is None:
                self._uploads = Path(tempfile.mkdtemp(prefix="lightning_grpo_refs_"))  # mode 0700
            path = self._uploads / f"{digest}.wav"
            if self._users[digest] == 0:
                tmp = path.with_suffix(".part")
                sf.write(str(tmp), data, rate, subtype="FLOAT", format="WAV")
                os.replace(tmp, path)
            self._users[digest] += 1
        return str(path), len(data) / rate

    def release(self, paths: Iterable[str]) -> None:
        """A request that stored these uploads is done with them; files nobody uses are removed."""
        with self._lock:
            for p in paths:
                digest = Path(p).stem
                self._users[digest] -= 1
                if self._users[digest] <= 0:
                    del self._users[digest]
                    Path(p).unlink(missing_ok=True)

    def close(self) -> None:
        if self._uploads is not None:
            shutil.rmtree(self._uploads, ignore_errors=True)

"""A /score request body, checked before any reward sees it: its schema, its codes, and the reference audio it
may carry (`parse_body`; the server answers a `BadRequest` with its status and detail).

A client of the scoring server (reward/server.py) gives a voice-cloning sample's reference voice in one of three
ways, and never as a path on the server's file system unless the operator allows one:

    prompt_codes   the reference's codec codes (the reward decodes them)
    prompt_audio   the recording itself: base64 of a WAV / FLAC / OGG file, at most --max-reference-seconds
    prompt_wav     a file name under the directory the operator started the server with (--reference-dir);
                   resolved with symlinks and `..` followed, `~` taken literally, and refused unless the real
                   path lies inside that directory

Every refusal of a `prompt_wav` reads the same whether the file is outside the directory, missing, unreadable or
not audio, so the server answers no question about its file system. One reference may last
--max-reference-seconds, the distinct references of one body --max-request-reference-seconds together, so no
body can hold the single scoring worker for minutes. Uploaded recordings are written, named by
the hash of their content, into a private temporary directory, so a reward reads them as it reads a data row's
recording (and caches their embeddings across requests); each file is removed when no request in flight uses it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ..llasa import MAX_REFERENCE_SECONDS, TOKENS_PER_SECOND, check_reference
from .base import SpeechSample

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
        try:
            real = Path(os.path.realpath(self.reference_dir / name))  # an absolute `name` replaces the directory
            if not name or not real.is_relative_to(self.reference_dir) or not real.is_file():
                raise refused
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            raise refused from None
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


# ------------------------------------------------------------------------------------------------- body


class SampleIn(BaseModel):
    """One sample of a request body; the original server's body is exactly {"tokens", "text"}."""

    model_config = ConfigDict(extra="forbid")
    tokens: list[StrictInt]  # at least one unless the app allows empty ones (parse_body)
    text: StrictStr = Field(min_length=1)
    language: StrictStr | None = None
    stopped: StrictBool = True
    truncated: StrictBool = False
    num_invalid: StrictInt = Field(0, ge=0)
    # voice cloning (SpeechSample): the reference clip's transcript and codes, and its recording: base64 file
    # bytes, or a file name under --reference-dir (module docstring)
    prompt_text: StrictStr | None = None
    prompt_codes: list[StrictInt] | None = None
    prompt_audio: StrictStr | None = None
    prompt_wav: StrictStr | None = None


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[SampleIn] = Field(min_length=1)


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _outside_codebook(codes: Sequence[int], codebook_size: int) -> tuple[int, int] | None:
    """(index, code) of the first code outside [0, codebook_size), or None (min/max first: the common case is fast)."""
    if min(codes, default=0) >= 0 and max(codes, default=0) < codebook_size:
        return None
    return next((j, c) for j, c in enumerate(codes) if not 0 <= c < codebook_size)


def _field_name(loc: Sequence[Union[str, int]]) -> str:
    """('samples', 0, 'tokens', 3) -> 'samples[0].tokens[3]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


@dataclass
class ParsedBody:
    samples: list[SpeechSample]
    batched: bool  # the {"samples": [...]} form
    uploads: list[str] = field(default_factory=list)  # stored prompt_audio files, released once answered


def parse_body(raw: bytes, codebook_size: int, max_samples: int, allow_empty: bool = False,
               references: RequestReferences | None = None,
               max_request_reference_seconds: float = float("inf")) -> ParsedBody:
    """Validate a /score body. Empty token lists are an error unless `allow_empty` (a reward owner: the reward
    itself gives them reason empty_speech). `references` checks and stores the reference recordings; without it
    a body that carries one (prompt_audio, prompt_wav) is refused. The distinct references of one body may
    last `max_request_reference_seconds` together.

    Raises BadRequest (400 malformed JSON, 422 schema, 413 too many samples or too long references) naming the field.
    """
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(400, f"body is not valid JSON ({e}); send {{\"tokens\": [...], \"text\": \"...\"}}")
    batched = isinstance(body, dict) and "samples" in body
    if batched and isinstance(body["samples"], list) and len(body["samples"]) > max_samples:
        raise BadRequest(
            413, f"samples has {len(body['samples'])} entries, more than --max-batch-samples={max_samples}; "
            "split the request"
        )
    try:
        items = BatchIn.model_validate(body).samples if batched else [SampleIn.model_validate(body)]
    except ValidationError as e:
        msgs = [f"{_field_name(err['loc'])}: {err['msg']}" for err in e.errors()[:10]]
        raise BadRequest(422, "invalid request body: " + "; ".join(msgs))
    parsed = ParsedBody([], batched)
    reference_seconds: dict[Any, float] = {}  # distinct reference -> its duration
    try:
        for i, item in enumerate(items):
            where = f"samples[{i}]." if batched else ""
            sample, key, seconds = _sample(item, where, codebook_size, allow_empty, references, parsed.uploads)
            parsed.samples.append(sample)
            if key is not None:
                reference_seconds[key] = seconds
                if sum(reference_seconds.values()) > max_request_reference_seconds:
                    raise BadRequest(
                        413, f"the distinct references of this body last more than --max-request-reference-seconds="
                        f"{max_request_reference_seconds:g} together (at {where or 'the sample'}); split the request"
                    )
    except BaseException:
        if references is not None:
            references.release(parsed.uploads)
        raise
    return parsed


def _sample(item: SampleIn, where: str, codebook_size: int, allow_empty: bool, references: RequestReferences | None,
            uploads: list[str]) -> tuple[SpeechSample, Any, float]:
    """One checked sample, the key of its reference (None without one) and the reference's duration in seconds;
    a stored upload's path is appended to `uploads`."""
    if not item.text.strip():
        raise BadRequest(422, f"invalid request body: {where}text is blank; send the ground-truth text")
    if not item.tokens and not allow_empty:
        raise BadRequest(422, f"invalid request body: {where}tokens is empty; send at least one codec code")
    bad = _outside_codebook(item.tokens, codebook_size)
    if bad is not None:
        raise BadRequest(
            422, f"invalid request body: {where}tokens[{bad[0]}] = {bad[1]} is outside the codebook "
            f"0..{codebook_size - 1}; send codec codes (speech token id minus the id of <|s_0|>), not vocabulary ids"
        )
    bad = _outside_codebook(item.prompt_codes or [], codebook_size)
    if bad is not None:
        raise BadRequest(
            422, f"invalid request body: {where}prompt_codes[{bad[0]}] = {bad[1]} is outside "
            f"the codebook 0..{codebook_size - 1}"
        )
    try:
        check_reference(item.prompt_text, item.prompt_codes)  # the data loader's rule: both or neither
    except ValueError as e:
        raise BadRequest(422, f"invalid request body: {where}{e}") from None
    if item.prompt_audio is not None and item.prompt_wav is not None:
        raise BadRequest(422, f"invalid request body: {where}give the recording as prompt_audio or prompt_wav, not both")
    wav, key, seconds = None, None, 0.0
    try:
        if (item.prompt_audio is not None or item.prompt_wav is not None) and references is None:
            raise ReferenceRejected(422, f"{where}prompt_audio / prompt_wav: this endpoint takes references as prompt_codes only")
        if item.prompt_codes:
            if references is not None:
                references.check_codes(item.prompt_codes, where)
            key, seconds = tuple(item.prompt_codes), codes_seconds(item.prompt_codes)
        if item.prompt_audio is not None:  # the reward uses the recording rather than the codes
            wav, seconds = references.store_upload(item.prompt_audio, where)
            uploads.append(wav)
        elif item.prompt_wav is not None:
            wav, seconds = references.resolve_path(item.prompt_wav, where)
        key = wav or key
    except ReferenceRejected as e:
        raise BadRequest(e.status, f"invalid request body: {e}") from None
    sample = SpeechSample(
        text=item.text, codes=list(item.tokens), stopped=item.stopped, truncated=item.truncated,
        num_invalid=item.num_invalid, language=item.language, prompt_text=item.prompt_text,
        prompt_codes=list(item.prompt_codes) if item.prompt_codes else None, prompt_wav=wav,
    )
    return sample, key, seconds

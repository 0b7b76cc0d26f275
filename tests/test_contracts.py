"""The contracts between the parts of one step: what a sampler must declare, what its `step` means in
training and validation, how prompt counts divide over ranks, and the shared rollout -> records form."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_grpo.batch import Rollout, rollout_records
from lightning_grpo.data import PromptDataModule
from lightning_grpo.distributed import concat_from_ranks, gather_from_ranks
from lightning_grpo.llasa import codes_to_ids
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.base import RewardResult
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import Completions, HFSampler, Sampler

ROOT = Path(__file__).parents[1]


class StepRecorder:
    """A Sampler that answers with fixed codes and records the `step` of every call, and in which loop."""

    temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, 8

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.calls = ids, []

    def setup(self, pl_module) -> None:
        pass

    def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None) -> Completions:
        self.calls.append(("train" if model.training else "val", step))  # Lightning validates in eval mode
        return Completions(ids=[list(self.ids)] * (len(prompts) * n), truncated=[False] * (len(prompts) * n))


@pytest.mark.parametrize("missing", ["temperature", "top_p", "top_k", "max_new_tokens"])
def test_a_sampler_without_a_declared_setting_is_an_error_naming_it(missing):
    members = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8,
               "setup": StepRecorder.setup, "sample": StepRecorder.sample}
    del members[missing]
    incomplete = type("Incomplete", (), members)()
    with pytest.raises(TypeError, match=rf"Incomplete has no {missing}: a sampler must expose temperature, top_p, top_k, max_new_tokens"):
        GRPORollout(incomplete, RuleReward(), group_size=2)
    assert isinstance(HFSampler(), Sampler) and isinstance(StepRecorder([1]), Sampler)


def test_a_sampler_with_an_invalid_setting_is_rejected_at_construction():
    bad = StepRecorder([1])
    bad.temperature = 0.0
    with pytest.raises(ValueError, match="--temperature=0.0 must be > 0"):
        GRPORollout(bad, RuleReward(), group_size=2)


def test_rollout_reads_the_samplers_temperature_not_a_default(vocab):
    sampler = StepRecorder(codes_to_ids([1, 2], vocab))
    sampler.temperature = 0.7
    policy = GRPOPolicy()
    cb = GRPORollout(sampler, RuleReward(), group_size=2)
    cb.setup(None, policy, "fit")
    r = cb.make_rollout(policy, {"text": ["hi"], "language": [None]}, 2, 0)
    assert (r.temperature, r.max_new_tokens) == (0.7, 8)


def test_the_samplers_step_counts_training_rollouts_in_training_and_validation(vocab):
    """Validation passes the same step as the next training rollout (the weights both sample from),
    whatever num_iterations makes of the trainer's optimiser-step count."""
    sampler = StepRecorder(codes_to_ids([1, 2, 3], vocab))
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, val_check_interval=1,
                        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[GRPORollout(sampler, RuleReward(), group_size=2)])
    trainer.fit(GRPOPolicy(num_iterations=2, learning_rate=1e-3), PromptDataModule(prompts_per_step=2, val_prompts_per_step=2))
    assert sampler.calls == [("train", 0), ("val", 1), ("train", 1), ("val", 2), ("train", 2), ("val", 3)]


def test_prompt_counts_are_over_all_ranks_for_training_and_validation():
    dm = PromptDataModule(prompts_per_step=4, val_prompts_per_step=6)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    dm.setup("fit")
    assert dm.per_rank_batch_size() == 2 and dm.val_dataloader().batch_size == 3
    dm = PromptDataModule(prompts_per_step=4, val_prompts_per_step=3)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"--data.val_prompts_per_step=3 is not divisible by the 2 training processes"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match="--data.val_prompts_per_step=0 must be >= 1"):
        PromptDataModule(val_prompts_per_step=0)


def test_one_rollout_to_records_function_for_reports_and_audio_logs():
    r = Rollout(
        input_ids=torch.zeros(4, 3, dtype=torch.long), attention_mask=torch.ones(4, 3), completion_mask=torch.ones(4, 1),
        prompt_width=2, rewards=torch.tensor([0.1, 0.9, 0.5, 0.2]), truncated=torch.tensor([False, False, True, False]),
        group_size=2, temperature=1.0, max_new_tokens=4, texts=["a", "a", "b", "b"],
        reward_result=RewardResult(rewards=torch.tensor([0.1, 0.9, 0.5, 0.2]),
                                   metrics={"cer": torch.tensor([1.0, 0.0, float("nan"), 0.5])},
                                   transcripts=["x", "a", "", "bb"]),
        completion_ids=[[1], [1, 2], [1, 2, 3], [4]],
    )
    records = rollout_records(r, ["en", "ko"])
    assert [x["language"] for x in records] == ["en", "en", "ko", "ko"]
    assert records[2] == {"text": "b", "language": "ko", "reward": 0.5, "completion_length": 3, "truncated": True,
                          "reason": "ok", "transcript": "", "cer": None}
    assert rollout_records(r, rows=[3, 1]) == [{**records[3], "language": None}, {**records[1], "language": None}]
    # evaluation and audio logging both use it; neither builds records of its own
    for module in ("evaluate", "sample_logging"):
        tree = ast.parse((ROOT / "lightning_grpo" / f"{module}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "batch" for a in n.names}
        assert "rollout_records" in imported, module
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "rollout_records" for n in ast.walk(tree)), module


def test_gather_over_ranks_is_one_helper_and_the_identity_in_one_process():
    assert gather_from_ranks({"a": 1}) == [{"a": 1}] and concat_from_ranks([1, 2]) == [1, 2]
    package = ROOT / "lightning_grpo"
    direct = [p.name for p in package.rglob("*.py") if "all_gather_object(" in p.read_text() and p.name != "distributed.py"]
    assert direct in ([], ["vllm_sampler.py"]), direct  # vllm_sampler gathers over a TP subgroup


def test_the_codebook_size_is_defined_once():
    """X-codec2's 65,536 codes appear as a number in one module; the others import it."""
    hits = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "lightning_grpo").rglob("*.py"))
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Constant) and n.value in (65_536, 65_537)]
    assert hits == ["lightning_grpo/llasa.py"], hits


def test_data_does_not_import_the_reward_package():
    tree = ast.parse((ROOT / "lightning_grpo" / "data.py").read_text())
    modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("reward" in m or m == "batch" for m in modules), modules


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import timing`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle of the import graph once, as the path around it (strongly connected components, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_package_modules_import_each_other():
    """A helper module does not import (or type-check against) the module that imports it, directly or round a
    longer loop: the import graph of lightning_grpo/ has no cycle."""
    graph = import_graph(ROOT / "lightning_grpo")
    assert "lightning_grpo.dynamic_sampling" in graph["lightning_grpo.rollout"]  # the graph sees the imports
    assert import_cycles(graph) == []


def test_reward_results_are_sliced_by_one_row_selection():
    """RewardResult.rows serves the server's batch routing, scoring's reorder and dynamic sampling's group pick."""
    result = RewardResult(rewards=torch.tensor([0.1, 0.2, 0.3]), metrics={"cer": torch.tensor([0.0, float("nan"), 1.0])},
                          reasons=["ok", "empty_speech", "ok"], transcripts=["a", "", "c"])
    picked = result.rows([2, 0, 2])
    assert picked.rewards.tolist() == pytest.approx([0.3, 0.1, 0.3]) and picked.metrics["cer"].tolist() == [1.0, 0.0, 1.0]
    assert picked.reasons == ["ok", "ok", "ok"] and picked.transcripts == ["c", "a", "c"]
    silent = RewardResult(rewards=torch.zeros(2))
    assert silent.rows([1]).transcripts == [] and RewardResult.cat([silent, silent]).transcripts == []  # none transcribes

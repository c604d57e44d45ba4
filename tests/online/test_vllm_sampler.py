"""The vLLM sampler (``online.sampler: vllm``), tested with CPU engines that implement its two calls:
weights reach the engine when the sampled-from model changes and the engine then samples from exactly
that model; the loop's log q, log pi, weights and advantages on given token ids equal those of
distalign's own sampler; settings that break the estimator are refused naming the option; without
vLLM the option fails with the install hint and nothing else changes."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from distalign_testing.engines import CpuEngine
from distalign_testing.runs import read_metrics

from distalign.config import ConfigError, load_config
from distalign.errors import SetupError
from distalign.models.engine_weights import engine_weights
from distalign.models.loading import LoraSettings, load_model_and_tokenizer
from distalign.models.vllm_engine import EngineSample, GenerationRequest
from distalign.train.online.loop import OnlineRun, train_online
from distalign.train.online.samplers import EngineSampler, build_sampler
from distalign.train.online.setup import LoopState, PromptSet

RLOO = {"method": "rloo", "target": None, "reward": {"name": "regex", "pattern": "s"}, "kl_coef": 0.05}
FDPG_CONFIG = [
    "online.method=fdpg",
    "online.target={scorers: [{kind: constraint, feature: {name: regex, pattern: s}}]}",
]


class ReplayEngine:
    """An engine that returns given completions, step by step, in request order (no log-probs)."""

    def __init__(self, completions_per_step: list[list[list[int]]]) -> None:
        self.steps = list(completions_per_step)

    def load_weights(self, weights) -> None:
        for _ in weights:  # consume the push, as an engine would
            pass

    def generate(self, requests, *, max_new_tokens, stop_token_ids):
        completions = iter(self.steps.pop(0))
        return [[EngineSample(next(completions)) for _ in range(r.num_samples)] for r in requests]


def _tokenizer():
    return load_model_and_tokenizer("tiny")[1]


def _cpu_engine() -> CpuEngine:
    """An engine for the tiny model, with random weights until the first push."""
    return CpuEngine(*load_model_and_tokenizer("tiny"))


def _max_difference(engine: CpuEngine, model: torch.nn.Module) -> float:
    """Largest difference between the engine's weights and ``model``'s (LoRA: merged, compared by logits
    on a fixed input, independently of how the push merged them)."""
    if hasattr(model, "peft_config"):
        ids = torch.arange(1, 25).reshape(2, 12)
        with torch.no_grad():
            return float((engine.model(ids).logits - model(ids).logits).abs().max())
    theirs = dict(model.named_parameters())
    return max(float((p - theirs[n]).detach().abs().max()) for n, p in engine.model.named_parameters())


@pytest.fixture
def compare_at_draw(monkeypatch):
    """Per draw, (step, engine-vs-sampled-model difference, engine-vs-policy difference)."""
    seen: list[tuple[int, float, float]] = []
    original = OnlineRun.sample

    def sample(self, step):
        rollout = original(self, step)
        model = self.sampled_model(step)[0]
        engine = self.sampler.engine
        seen.append((step, _max_difference(engine, model), _max_difference(engine, self.policy)))
        return rollout

    monkeypatch.setattr(OnlineRun, "sample", sample)
    return seen


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_on_policy_pushes_every_step_and_samples_from_the_current_policy(
    tmp_path, online_config, compare_at_draw, lora
):
    model = {"name": "tiny", "lora": {"enabled": lora, "target_modules": "all-linear"}}
    config = online_config(tmp_path, model=model, train={"max_steps": 3}, online={"sampler": "vllm"})
    engine = _cpu_engine()
    records = read_metrics(train_online(config, generation_engine=engine))
    assert engine.pushes_at_draw == [1, 2, 3]  # one push before each step's draw
    every_name = {name for name, _ in engine.model.named_parameters()}
    assert all(names == every_name for names in engine.pushed_names)  # each push is the whole model
    tolerance = 1e-5 if lora else 0.0  # LoRA: W + BA against the adapter's own forward, to rounding
    assert [s for s, _, _ in compare_at_draw] == [1, 2, 3]
    assert all(to_sampled <= tolerance for _, to_sampled, _ in compare_at_draw)
    assert [r["sampler/weight_pushes"] for r in records] == [1.0, 2.0, 3.0]
    # The engine's own log-prob of each draw is our head's log q, to float rounding.
    assert all(r["sampler/logprob_gap/max_abs"] < 1e-4 for r in records)
    assert abs(records[0]["kl_pi_a"]) < 1e-5  # step 1: pi = a, scored by our head
    assert {"time/sync", "time/score_policy"} <= records[0].keys()


def test_off_policy_pushes_q_every_sync_every_steps_and_weights_use_the_stale_log_q(
    tmp_path, online_config, compare_at_draw
):
    # RLOO refreshes q only on the ESS rule, set so low that only sync_every refreshes it.
    online = {
        **RLOO,
        "sampler": "vllm",
        "vllm": {"sync_every": 2},
        "proposal": "offline",
        "refresh_min_ess_fraction": 1e-9,
        "max_importance_weight": None,
    }
    config = online_config(tmp_path, train={"max_steps": 5}, online=online)
    engine = _cpu_engine()
    records = read_metrics(train_online(config, generation_engine=engine))
    assert engine.pushes_at_draw == [1, 1, 2, 2, 3]  # q refreshed at steps 2 and 4, pushed after
    assert [r["proposal/refreshes"] for r in records] == [0.0, 1.0, 1.0, 2.0, 2.0]
    for step, to_sampled, to_policy in compare_at_draw:
        assert to_sampled == 0.0  # the engine holds q exactly
        if step in (2, 4):
            assert to_policy > 1e-4  # ... which is stale: the policy has moved since q was pushed
    for record in records:
        # log q is the stale weights' (the engine's own log-prob of its draws, to rounding), and it
        # differs from log pi where q is stale: the importance weights are not all 1.
        assert record["sampler/logprob_gap/max_abs"] < 1e-4
    stale = [r for r in records if r["step"] in (2, 4)]
    assert all(r["is/ess_fraction"] < 1.0 - 1e-6 for r in stale)
    assert {"time/sync", "time/score_proposal"} <= records[0].keys()


def _record_steps(monkeypatch) -> tuple[list, list]:
    """(rollouts, (batch, signal) per step) of the runs that follow."""
    rollouts, signals = [], []
    sample, step_signal = OnlineRun.sample, LoopState.step_signal

    def recording_sample(self, step):
        rollout = sample(self, step)
        rollouts.append(rollout)
        return rollout

    def recording_signal(self, cfg, batch):
        signal = step_signal(self, cfg, batch)
        signals.append((batch, signal))
        return signal

    monkeypatch.setattr(OnlineRun, "sample", recording_sample)
    monkeypatch.setattr(LoopState, "step_signal", recording_signal)
    return rollouts, signals


@pytest.mark.parametrize(
    ("online", "micro_batch_size"),
    [
        ({}, 16),
        ({}, 32),  # log pi (= log q) from the update's own forward, no scoring pass
        ({"proposal": "offline", "refresh_min_ess_fraction": 0.9, "max_importance_weight": None}, 16),
        (RLOO, 16),
    ],
    ids=["fdpg_on_policy", "fdpg_on_policy_update_forward", "fdpg_offline", "rloo"],
)
def test_ratios_and_signal_equal_those_of_hf_sampling_on_the_same_token_ids(
    tmp_path, online_config, monkeypatch, online, micro_batch_size
):
    rollouts, signals = _record_steps(monkeypatch)
    train = {"max_steps": 3, "micro_batch_size": micro_batch_size}
    train_online(online_config(tmp_path / "hf", train=train, online=online))
    hf_rollouts, hf_signals = list(rollouts), list(signals)
    rollouts.clear(), signals.clear()
    replay = ReplayEngine([r.completion_ids for r in hf_rollouts])
    records = read_metrics(
        train_online(
            online_config(tmp_path / "vllm", train=train, online={**online, "sampler": "vllm"}),
            generation_engine=replay,
        )
    )
    fused = micro_batch_size == 32
    assert all((r["time/score_policy"] == 0.0) == fused for r in records)
    assert [r.completion_ids for r in rollouts] == [r.completion_ids for r in hf_rollouts]
    assert [bool(e) for r in rollouts for e in r.ended_with_eos] == [
        bool(e) for r in hf_rollouts for e in r.ended_with_eos
    ]
    close = {"rtol": 0.0, "atol": 1e-4}
    for (hf_batch, hf_signal), (batch, signal) in zip(hf_signals, signals, strict=True):
        # log q from our head's teacher-forced pass = log q of the draw (incremental KV cache), to rounding
        torch.testing.assert_close(batch.proposal_logps, hf_batch.proposal_logps, **close)
        torch.testing.assert_close(batch.policy_logps, hf_batch.policy_logps, **close)
        torch.testing.assert_close(batch.base_logps, hf_batch.base_logps, **close)
        if hf_batch.target_logps is not None:
            torch.testing.assert_close(batch.target_logps, hf_batch.target_logps, **close)
        torch.testing.assert_close(signal.advantages, hf_signal.advantages, **close)
        if hf_signal.weights is None:
            assert signal.weights is None
        else:  # pi / q, unclipped
            torch.testing.assert_close(signal.weights, hf_signal.weights, rtol=1e-4, atol=0.0)
    if online.get("proposal") == "offline":
        assert any(float(s.weights.std()) > 1e-3 for _, s in hf_signals)  # the ratios were not all 1


@pytest.mark.parametrize(
    ("setting", "value"),
    [("top_p", 0.8), ("top_k", 50), ("min_p", 0.05), ("temperature", 0.7), ("repetition_penalty", 1.1)],
)
def test_settings_that_change_the_sampled_distribution_are_refused_naming_them(setting, value):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*FDPG_CONFIG, "online.sampler=vllm", f"online.vllm.{setting}={value}"])
    assert f"online.vllm.{setting}={value}" in str(error.value)
    assert "refused" in str(error.value)


def test_identity_settings_are_accepted():
    identities = ["top_p=1.0", "top_k=-1", "top_k=0", "temperature=1", "min_p=0"]
    for setting in identities:
        config = load_config(None, [*FDPG_CONFIG, "online.sampler=vllm", f"online.vllm.{setting}"])
        assert config.online.vllm.sync_every is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["online.sampler=vllm", "online.vllm.sync_every=2"],
            "online.vllm.sync_every=2 with online.proposal=on_policy",
        ),
        (["online.vllm.gpu_memory_utilization=0.5"], "online.vllm is used only with online.sampler: vllm"),
        (
            ["online.sampler=vllm", "online.vllm.gpu_memory_utilization=1.5"],
            "online.vllm.gpu_memory_utilization",
        ),
    ],
)
def test_vllm_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*FDPG_CONFIG, *overrides])
    assert message in str(error.value)


def test_stale_syncs_are_accepted_off_policy():
    overrides = ["online.sampler=vllm", "online.vllm.sync_every=4", "online.proposal=offline"]
    assert load_config(None, [*FDPG_CONFIG, *overrides]).online.vllm.sync_every == 4


def test_without_vllm_the_option_names_the_install_and_everything_else_works(
    tmp_path, online_config, monkeypatch
):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    config = load_config(None, [*FDPG_CONFIG, "online.sampler=vllm"])  # the config loads without it
    assert config.online.sampler == "vllm"
    with pytest.raises(SetupError, match=r"pip install 'distalign\[vllm\]'"):
        train_online(online_config(tmp_path / "vllm", train={"max_steps": 1}, online={"sampler": "vllm"}))
    records = read_metrics(train_online(online_config(tmp_path / "hf", train={"max_steps": 1})))
    assert records[0]["step"] == 1 and "sampler/weight_pushes" not in records[0]


def test_vllm_with_several_processes_is_refused(online_config, tmp_path):
    config = online_config(tmp_path, online={"sampler": "vllm"})
    two_processes = types.SimpleNamespace(world_size=2, device=torch.device("cpu"))
    with pytest.raises(SetupError, match="online.sampler=vllm runs one engine in this process"):
        build_sampler(config, two_processes, None, _tokenizer(), _cpu_engine())


#: `distalign train` in a fresh interpreter in which `import vllm` fails, whether or not it is installed.
WITHOUT_VLLM = "import sys; sys.modules['vllm'] = None; from distalign.cli import main; sys.exit(main())"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["online.vllm.top_k=50"], "online.vllm.top_k=50 is refused"),
        ([], "pip install 'distalign[vllm]'"),
    ],
    ids=["truncation", "no_vllm"],
)
def test_the_cli_exits_2_naming_the_option(tmp_path, overrides, message):
    args = ["train", "configs/fdpg_tiny.yaml", "online.sampler=vllm", *overrides, f"output_dir={tmp_path}"]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_VLLM, *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_vllm_without_a_cuda_gpu_is_refused(tmp_path, online_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SetupError, match="no CUDA GPU.*online.sampler=hf"):
        train_online(online_config(tmp_path, train={"max_steps": 1}, online={"sampler": "vllm"}))


def test_merged_lora_weights_give_the_adapted_model_and_leave_it_untouched():
    policy, _ = load_model_and_tokenizer("tiny", lora=LoraSettings(target_modules="all-linear"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    plain, _ = load_model_and_tokenizer("tiny")
    params = dict(plain.named_parameters())
    merged = dict(engine_weights(policy))
    assert merged.keys() == params.keys()  # plain names, every parameter, no adapter matrices
    with torch.no_grad():
        for name, tensor in merged.items():
            params[name].copy_(tensor)
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        assert float((plain(ids).logits - policy(ids).logits).abs().max()) < 1e-5
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # bit-identical


class _Scripted:
    """An engine that returns scripted token ids for each request."""

    def __init__(self, completions: list[list[int]]) -> None:
        self.completions = completions

    def load_weights(self, weights) -> None:
        pass

    def generate(self, requests, *, max_new_tokens, stop_token_ids):
        return [[EngineSample(ids) for ids in self.completions] for _ in requests]


def _scripted_draw(completions: list[list[int]], max_new_tokens: int = 4):
    sampler = EngineSampler(_Scripted(completions), _tokenizer(), [2], max_new_tokens=max_new_tokens, seed=0)
    sampler.sync(torch.nn.Linear(1, 1), "v0")
    prompts = PromptSet(ids=[[1, 5]], keys=["p"], contexts=["p"])
    return sampler.draw(
        torch.nn.Linear(1, 1), prompts, [0] * len(completions), [0] * len(completions), step=1, rank=0
    )


def test_completions_end_at_the_first_stop_token_or_max_new_tokens():
    rollout = _scripted_draw([[7, 2, 9], [7, 8, 9, 10]])
    assert rollout.completion_ids == [[7, 2], [7, 8, 9, 10]]  # kept the stop token, dropped what followed
    assert rollout.ended_with_eos.tolist() == [True, False]
    assert rollout.proposal_logps is None  # log q is for the loop's own head to compute


def test_an_engine_that_stops_elsewhere_is_an_error():
    with pytest.raises(RuntimeError, match="must end at a stop token or at max_new_tokens"):
        _scripted_draw([[7, 8]])  # neither a stop token nor max_new_tokens: a stop string, min_tokens...


def test_requests_follow_the_prompt_runs_with_their_own_seeds():
    asked: list[GenerationRequest] = []

    class Recording(_Scripted):
        def generate(self, requests, **kwargs):
            asked.extend(requests)
            return [[EngineSample([2]) for _ in range(r.num_samples)] for r in requests]

    sampler = EngineSampler(Recording([]), _tokenizer(), [2], max_new_tokens=4, seed=0)
    sampler.sync(torch.nn.Linear(1, 1), "v0")
    prompts = PromptSet(ids=[[1, 5], [1, 6]], keys=["a", "b"], contexts=["a", "b"])
    sampler.draw(torch.nn.Linear(1, 1), prompts, [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 2], step=3, rank=0)
    assert [(r.prompt_ids, r.num_samples) for r in asked] == [([1, 5], 2), ([1, 6], 3), ([1, 5], 1)]
    assert len({r.seed for r in asked}) == 3
    assert not sampler.sync(torch.nn.Linear(1, 1), "v0") and sampler.sync(torch.nn.Linear(1, 1), "v1")
    assert sampler.weight_pushes == 2

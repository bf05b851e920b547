"""The examples run and do what they say: `examples/ppo_loop.py` trains its policy and critic and keeps the reference
frozen, sharing its lower layers with the policy."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead

ROOT = Path(__file__).resolve().parent.parent
PPO_LOOP = ROOT / "examples" / "ppo_loop.py"
STEPS, SEED = 20, 0


def load_example(path: Path):
    """The example as a module, imported from its file (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module while the file runs
    spec.loader.exec_module(module)
    return module


def test_the_ppo_loop_trains_the_policy_and_critic_and_keeps_the_shared_reference_frozen(tmp_path):
    ppo_loop = load_example(PPO_LOOP)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script's main() does: the run (and its numbers) as on the command line
    try:
        run = ppo_loop.run_ppo(STEPS, SEED, tmp_path / "run")
        initial = ppo_loop.build_policy(tmp_path / "initial", SEED)  # the policy before training, rebuilt
    finally:
        torch.set_num_threads(threads)
    metrics = run.metrics

    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert all(math.isfinite(m[key]) for m in metrics for key in ("reward", "kl", "policy_loss", "value_loss"))
    # The first rollout's policy is the reference: the one-pass forward gives both exactly the same log-probs.
    assert metrics[0]["kl"] == 0.0
    # The fresh critic (normal init) starts off and learns: seed 0 goes from 0.43 to 0.06 (over seeds 0-4: <= 0.2x).
    first_value_loss = metrics[0]["value_loss"]
    last_value_loss = sum(m["value_loss"] for m in metrics[-3:]) / 3
    assert last_value_loss < 0.5 * first_value_loss, [m["value_loss"] for m in metrics]
    # The policy learns to say the target word: seed 0 goes from 0.05 to 0.8 (over seeds 0-4: by 0.45 at least).
    first_reward = sum(m["reward"] for m in metrics[:5]) / 5
    last_reward = sum(m["reward"] for m in metrics[-5:]) / 5
    assert last_reward > first_reward + 0.3, [m["reward"] for m in metrics]

    # The reference is the initial policy, bit for bit, and frozen.
    model, reference = run.model, run.ref_model
    reference_state, initial_state = reference.state_dict(), initial.state_dict()
    assert reference_state.keys() == initial_state.keys()
    assert all(torch.equal(reference_state[key], initial_state[key]) for key in initial_state)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())

    # What it shares (embeddings and layer 0) is the policy's own memory, frozen in the policy too, so unchanged ...
    shared = set(reference.shared_trunk.parameters)
    assert "pretrained_model.model.embed_tokens.weight" in shared
    assert any(name.startswith("pretrained_model.model.layers.0.") for name in shared)
    assert not any(name.startswith("pretrained_model.model.layers.1.") for name in shared)
    for name in shared:
        own = model.get_parameter(name)
        assert own.data_ptr() == reference.get_parameter(name).data_ptr(), name
        assert not own.requires_grad and torch.equal(own, initial.get_parameter(name)), name
    # ... and every other parameter of the policy (layer 1, final norm, LM head, value head) trained.
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, initial.get_parameter(name))}
    assert changed == {name for name, _ in model.named_parameters()} - shared
    assert any(name.startswith("v_head.") for name in changed)


def test_the_ppo_loop_runs_as_a_script_and_saves_a_policy_that_reloads(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(PPO_LOOP), "--steps", "2", "--seed", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    step_lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(step_lines) == 2
    for line in step_lines:
        for label in ("reward", "kl", "policy loss", "value loss"):
            assert label in line, line

    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert isinstance(policy, AutoModelForCausalLMWithValueHead)
    assert policy.v_head_source.is_loaded  # the trained head came back, not a fresh one

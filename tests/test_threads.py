"""Threads (issue 15, item 4): scoring with the reward adapter and `as_reference` switch the adapters and the modes
under the model's lock, and every forward and `generate` hold that lock, so no call runs with another thread's switch
in effect."""

import threading

import pytest
import torch
from conftest import model_inputs, policy_lora

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.adapters import _tuner_layers

SCORERS = 8
ITERATIONS = 3
POLICY_FORWARDS = 30


@pytest.fixture
def model(llama_dir, reward_adapter_dir):
    """A PEFT policy with a reward adapter, in train mode. No head dropout (the tiny configs have none either), so a
    train-mode forward is deterministic and equals the single-threaded one."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), reward_adapter=reward_adapter_dir, summary_dropout_prob=0.0
    )
    return model.train()


def adapter_state(model) -> dict:
    """Everything a switch changes and must put back."""
    layers = _tuner_layers(model.pretrained_model)
    return {
        "active adapter": model.pretrained_model.base_model.active_adapter,
        "active per layer": [tuple(layer.active_adapters) for layer in layers],
        "enabled per layer": [not layer.disable_adapters for layer in layers],
        "requires_grad": {name: parameter.requires_grad for name, parameter in model.named_parameters()},
        "training": {name: module.training for name, module in model.named_modules()},
    }


def run_threads(targets) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"


def test_eight_scoring_threads_and_a_policy_thread_get_the_single_threaded_results_and_leave_the_state(model):
    batches = [model_inputs("llama", batch=2, length=6 + index % 3, seed=index) for index in range(SCORERS)]
    policy_batch = model_inputs("llama", batch=3, length=8, seed=100)

    def scorer_results(batch) -> dict[str, torch.Tensor]:
        return {
            "sequence scores": model.compute_sequence_scores(**batch),
            "reward scores": model.compute_reward_score(**batch),
            "reference logprobs": model.compute_reference_logprobs(**batch),
            "values": model.compute_values(**batch).detach(),
        }

    def policy_results() -> dict[str, torch.Tensor]:
        output = model(**policy_batch)  # train mode, with gradients, as in a PPO step
        return {"logits": output.logits.detach(), "value": output.value.detach()}

    expected = [scorer_results(batch) for batch in batches]
    expected_policy = policy_results()
    before = adapter_state(model)
    seen_by_policy = []  # (training, active adapter) of each policy forward's wrapped model, read as it runs
    policy_thread = []

    def record(module, args, kwargs):
        if threading.get_ident() in policy_thread:
            seen_by_policy.append((module.training, tuple(module.active_adapters)))

    handle = model.pretrained_model.register_forward_pre_hook(record, with_kwargs=True)
    mismatches, barrier = [], threading.Barrier(SCORERS + 1)

    def score(index: int) -> None:
        barrier.wait()
        for iteration in range(ITERATIONS):
            for name, result in scorer_results(batches[index]).items():
                if not torch.equal(result, expected[index][name]):
                    mismatches.append(f"scorer {index}, iteration {iteration}: {name}")

    def run_policy() -> None:
        policy_thread.append(threading.get_ident())
        barrier.wait()
        for iteration in range(POLICY_FORWARDS):
            for name, result in policy_results().items():
                if not torch.equal(result, expected_policy[name]):
                    mismatches.append(f"policy forward {iteration}: {name}")

    try:
        run_threads([*(lambda index=index: score(index) for index in range(SCORERS)), run_policy])
    finally:
        handle.remove()

    assert mismatches == []
    assert seen_by_policy == [(True, ("default",))] * POLICY_FORWARDS
    assert adapter_state(model) == before


def test_a_forward_waits_for_a_switch_in_another_thread_and_runs_with_the_policy(model):
    """Deterministic: while one thread is inside `as_reference()`, another thread's forward does not run; it runs when
    the switch is over, with the policy's adapter and modes."""
    inputs = model_inputs("llama")
    expected = model(**inputs).logits.detach()
    with model.as_reference():
        reference_logits = model(**inputs).logits
    assert not torch.equal(reference_logits, expected)  # the switch does change the forward
    done, result = threading.Event(), {}

    def forward() -> None:
        result["logits"] = model(**inputs).logits.detach()
        done.set()

    with model.as_reference():
        thread = threading.Thread(target=forward)
        thread.start()
        finished_during_switch = done.wait(timeout=0.5)
    thread.join(timeout=60)

    assert not finished_during_switch
    assert torch.equal(result["logits"], expected)


def test_a_score_waits_for_a_generation_in_another_thread_to_finish(model):
    """`generate` holds the lock throughout: a score asked for mid-generation (here at its third step) runs after the
    last token, so no step runs with the reward adapter on."""
    model.eval()
    prompt = model_inputs("llama")["input_ids"][1:]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected_tokens = model.generate(prompt, **settings)
    batch = model_inputs("llama", seed=3)
    expected_scores = model.compute_sequence_scores(**batch)
    generating, steps, scorer, result = threading.get_ident(), [], [], {}

    def score() -> None:
        result["scores"] = model.compute_sequence_scores(**batch)

    def start_a_score_mid_generation(module, args, kwargs):
        if threading.get_ident() != generating:
            return
        steps.append(1)
        if len(steps) == 3:
            scorer.append(threading.Thread(target=score))
            scorer[0].start()
            scorer[0].join(timeout=0.3)  # it waits for the lock: the generation goes on
            result["finished mid-generation"] = not scorer[0].is_alive()

    # on the bare model: peft's generate calls it, not the PeftModel, at each step
    language_model = model.pretrained_model.get_base_model()
    handle = language_model.register_forward_pre_hook(start_a_score_mid_generation, with_kwargs=True)
    try:
        tokens = model.generate(prompt, **settings)
    finally:
        handle.remove()
    scorer[0].join(timeout=60)

    assert result["finished mid-generation"] is False
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(result["scores"], expected_scores)


def test_the_lock_is_re_entrant_for_forwards_inside_a_switch_and_nested_switches(model):
    inputs = model_inputs("llama")
    model.eval()
    with model.pretrained_model.disable_adapter():
        base_logits = model(**inputs).logits
    with model._adapter_lock, model.as_reference():  # the reference of a policy without a reference adapter: the base
        logits = model(**inputs).logits
        scores = model.compute_sequence_scores(**inputs)  # a switch inside a switch, then back to the reference
        logits_after = model(**inputs).logits
    assert torch.equal(logits, base_logits) and torch.equal(logits_after, base_logits)
    assert torch.equal(scores, model.compute_sequence_scores(**inputs))


def test_calls_in_several_threads_run_at_once(model):
    """Forwards hold the lock shared: a forward waits for a switch, not for another forward (8 threads computing
    values, or `nn.DataParallel`'s replicas, which share the lock, are not run one by one)."""
    inputs = model_inputs("llama")
    model.eval()
    expected = model.compute_values(**inputs)
    inside = {"first": threading.Event(), "second": threading.Event()}
    threads, results = {}, {}

    def meet(module, args):  # each forward, once inside, waits until the other one is inside too
        name = threads.pop(threading.get_ident(), None)
        if name is not None:
            inside[name].set()
            other = "second" if name == "first" else "first"
            results[f"{name} met {other}"] = inside[other].wait(timeout=10)

    def run(name: str) -> None:
        threads[threading.get_ident()] = name
        results[name] = model.compute_values(**inputs)

    handle = model.pretrained_model.get_decoder().layers[0].register_forward_pre_hook(meet)
    try:
        run_threads([lambda: run("first"), lambda: run("second")])
    finally:
        handle.remove()
    assert results["first met second"] and results["second met first"]
    assert torch.equal(results["first"], expected) and torch.equal(results["second"], expected)


def test_a_score_inside_a_forward_in_two_threads_at_once_neither_deadlocks_nor_leaks(model):
    """A switch asked for inside a call (a hook that scores) while another thread is inside its own call: each gives
    up its shared hold while it waits, so the two do not wait on each other, and each forward goes on with the
    policy's adapter and modes."""
    model.eval()
    batches = [model_inputs("llama", seed=seed) for seed in range(2)]
    expected_values = [model.compute_values(**batch) for batch in batches]
    expected_scores = [model.compute_sequence_scores(**batch) for batch in batches]
    before = adapter_state(model)
    both_inside, scoring, results = threading.Barrier(2, timeout=30), {}, {}

    def score_from_inside(module, args):
        index = scoring.pop(threading.get_ident(), None)  # the first layer-0 call of each thread: its forward's
        if index is not None:
            both_inside.wait()  # both forwards hold the lock shared here
            results[f"scores {index}"] = model.compute_sequence_scores(**batches[index])

    def run(index: int) -> None:
        scoring[threading.get_ident()] = index
        results[f"values {index}"] = model.compute_values(**batches[index])

    handle = model.pretrained_model.get_decoder().layers[0].register_forward_pre_hook(score_from_inside)
    try:
        run_threads([lambda: run(0), lambda: run(1)])
    finally:
        handle.remove()
    for index in range(2):
        assert torch.equal(results[f"scores {index}"], expected_scores[index])
        assert torch.equal(results[f"values {index}"], expected_values[index])
    assert adapter_state(model) == before

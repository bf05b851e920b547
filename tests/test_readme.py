"""The README's Python quickstart runs as written (with a tiny local model in place of the placeholder id)."""

import re
from pathlib import Path

import torch

README = Path(__file__).parent.parent / "README.md"


def test_quickstart_runs(llama_dir, tmp_path, monkeypatch):
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", quickstart, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(code.replace("path/or/hub-id", str(llama_dir)), "README.md", "exec"), namespace)

    assert type(namespace["model"]).__name__ == "AutoModelForCausalLMWithValueHead"
    assert namespace["model"].v_head_source.is_loaded  # the last line reloads "my-critic"
    assert namespace["values"].shape == (1, 4) and namespace["tokens"].shape[1] > 4


def test_multi_adapter_example_runs(llama_dir, reward_adapter_dir, tmp_path, monkeypatch):
    section = README.read_text().split("## PEFT policies, reward adapters and the reference", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    code = code.replace('"base-model"', repr(str(llama_dir))).replace('"reward-adapter"', repr(str(reward_adapter_dir)))
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)

    model = namespace["model"]  # reloaded from "ppo-policy"
    assert model.is_peft_model and model.v_head_source.file.endswith("value_head.safetensors")
    assert namespace["rewards"].shape == (2,) and namespace["reference_logprobs"].shape == (2, 4)
    assert namespace["values"].shape == (2, 5) and namespace["reference_logits"].shape == (2, 5, 96)


def test_reference_example_runs(llama_dir):
    section = README.read_text().split("## Reference models that share layers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)

    namespace: dict = {}
    exec(compile(code.replace("path/or/hub-id", str(llama_dir)), "README.md", "exec"), namespace)

    output, ref_model = namespace["output"], namespace["ref_model"]
    assert namespace["kl"].shape == (1, 4)
    with torch.no_grad():
        expected = ref_model(namespace["input_ids"], attention_mask=namespace["attention_mask"]).logits
    torch.testing.assert_close(output.ref_logits, expected, rtol=0, atol=1e-5)
    assert ref_model.shared_trunk.num_shared_layers == 1


def test_every_test_file_the_guarantees_name_exists():
    guarantees = README.read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+\.py)`", guarantees))
    assert len(named) >= 7
    assert sorted(name for name in named if not (Path(__file__).parent / name).is_file()) == []

"""The README's Python quickstart runs as written (with a tiny local model in place of the placeholder id)."""

import re
from pathlib import Path

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

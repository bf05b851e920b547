"""Shared fixtures. The hub is offline for every test: huggingface_hub reads these variables when it is imported."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from architectures import SEQ2SEQ_FAMILIES, VOCAB_SIZE, tiny_config  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM  # noqa: E402

import transformers_vhead  # noqa: E402, F401  (registers the auto classes)
from transformers_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead  # noqa: E402
from transformers_vhead.demo import tiny_tokenizer  # noqa: E402


def is_seq2seq(family: str) -> bool:
    return family in SEQ2SEQ_FAMILIES


def bare_class(family: str):
    """The transformers auto class of the plain model of `family`."""
    return AutoModelForSeq2SeqLM if is_seq2seq(family) else AutoModelForCausalLM


def value_head_class(family: str):
    return AutoModelForSeq2SeqLMWithValueHead if is_seq2seq(family) else AutoModelForCausalLMWithValueHead


def build_bare(family: str, seed: int = 0, num_layers: int = 2):
    """A plain tiny model of `family` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return bare_class(family).from_config(tiny_config(family, num_layers)).eval()


def model_inputs(family: str, batch: int = 2, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with the first row left-padded by two tokens (and decoder inputs for seq2seq models)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :2], attention_mask[0, :2] = 0, 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if is_seq2seq(family):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB_SIZE, (batch, length - 2), generator=generator)
    return inputs


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    """A plain tiny Llama causal LM saved to disk (no value head)."""
    path = tmp_path / "llama"
    build_bare("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def trl_ppo():
    """TRL 1.12's value-head module, the reference implementation. Tests using it skip, saying why, when TRL is not
    installed, or cannot run a forward on the installed transformers (TRL is no longer maintained for new releases)."""
    try:
        import trl.experimental.ppo as module
    except ImportError as exc:
        pytest.skip(f"TRL 1.12 (the `trl` extra) is not installed; it is the reference to compare with ({exc})")
    except Exception as exc:  # an import that breaks on a transformers TRL 1.12 predates
        pytest.skip(f"TRL 1.12 cannot be imported with transformers {transformers.__version__}: {exc!r}")
    try:
        model = module.AutoModelForCausalLMWithValueHead.from_pretrained(build_bare("llama"))
        model(**model_inputs("llama"), return_past_key_values=True)
    except Exception as exc:
        pytest.skip(f"TRL 1.12 cannot run a forward on transformers {transformers.__version__}: {exc!r}")
    return module


def populate_hub_cache(cache_dir: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> Path:
    """Copies the files of `source` into an offline hub cache as the `main` revision of `repo_id`, laid out as
    huggingface_hub writes it (`models--org--name/{refs/main, snapshots/<commit>/...}`). Returns the snapshot folder."""
    repo_folder = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot


# LoRA settings of the test adapters. `init_lora_weights=False` makes them change the outputs (a fresh LoRA is a no-op).
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def policy_lora(**overrides):
    """A CAUSAL_LM LoRA config for a tiny Llama policy."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **{**LORA, **overrides})


def save_reward_adapter(base_dir: Path, path: Path, seed: int = 1, num_labels: int = 1) -> Path:
    """A SEQ_CLS LoRA reward adapter of the model in `base_dir`, with its `score` head, saved by peft to `path`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    reward_model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    get_peft_model(reward_model, LoraConfig(task_type="SEQ_CLS", **LORA)).save_pretrained(path)
    return path


@pytest.fixture
def reward_adapter_dir(llama_dir: Path, tmp_path: Path) -> Path:
    """A SEQ_CLS LoRA reward adapter (one label) of the tiny Llama in `llama_dir`."""
    return save_reward_adapter(llama_dir, tmp_path / "reward-adapter")

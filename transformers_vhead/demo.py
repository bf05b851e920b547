"""A self-contained demo on a tiny local model: build, save, reload through `AutoModelForCausalLM`, generate, value.

Nothing is downloaded: the tokenizer is a word-level one built with `tokenizers`, the model a 2-layer Llama.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .modeling import AutoModelForCausalLMWithValueHead

DEMO_WORDS = (
    "the a an this that text answer value reward critic policy model head is was good bad great poor "
    "very quite not and or but so it we you they says gives learns scores"
).split()
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def tiny_tokenizer(words: tuple[str, ...] | list[str] = DEMO_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (ids 4...), with `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int) -> LlamaConfig:
    """A 2-layer Llama over `tokenizer`'s vocabulary (the special ids of [`tiny_tokenizer`]), MLP twice as wide."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@dataclass
class DemoResult:
    """What the demo produced: the generated text and, for each of its tokens, the token and its value."""

    model_dir: str
    model_class: str
    generated_text: str
    token_values: list[tuple[str, float]]
    weights_identical: bool
    max_value_difference: float


def run_demo(output_dir: str, seed: int = 0) -> DemoResult:
    """Builds a tiny Llama, wraps it with a value head, saves it, reloads it through `AutoModelForCausalLM`, generates
    greedily from a prompt and computes the values of the result.

    Args:
        output_dir: where the plain model (`base/`) and the value-head model (`critic/`) are saved.
        seed: the seed of the random weights.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = tiny_llama_config(tokenizer, hidden_size=64)
    base_dir, critic_dir = os.path.join(output_dir, "base"), os.path.join(output_dir, "critic")
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(base_dir, v_head_init_strategy="normal")
    model.save_pretrained(critic_dir)
    tokenizer.save_pretrained(critic_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(critic_dir)  # the value-head class, through the auto class
    prompt = tokenizer(["the critic says this answer is"], return_tensors="pt")
    with torch.no_grad():
        sequence = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        values = reloaded.compute_values(sequence)[0]
        max_value_difference = (values - model.compute_values(sequence)[0]).abs().max().item()
    saved, loaded = model.state_dict(), reloaded.state_dict()
    weights_identical = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    tokens = tokenizer.convert_ids_to_tokens(sequence[0].tolist())
    return DemoResult(
        model_dir=critic_dir,
        model_class=type(reloaded).__name__,
        generated_text=tokenizer.decode(sequence[0], skip_special_tokens=True),
        token_values=[(token, round(value, 4)) for token, value in zip(tokens, values.tolist(), strict=True)],
        weights_identical=weights_identical,
        max_value_difference=max_value_difference,
    )

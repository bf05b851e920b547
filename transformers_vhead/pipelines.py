"""The "value-scoring" pipeline: one score per text from a value-head model, or from its reward adapter when it has one.

```python
import transformers_vhead  # registers the task
from transformers import pipeline

scorer = pipeline("value-scoring", model="path/to/critic")
scorer("the answer is good")  # {"score": 0.12}
scorer(["a text", "another text"], batch_size=2, return_values=True)  # [{"score", "values", "tokens"}, ...]
```
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Pipeline, PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import Chat

from .errors import EmptySequenceError, InvalidInputError, NotAValueHeadModelError
from .modeling import PreTrainedModelWrapper

TASK = "value-scoring"
SEQ2SEQ_KEYS = {"text", "text_target"}


@contextmanager
def _collate_padding(tokenizer: PreTrainedTokenizerBase, padding_side: str | None) -> Iterator[None]:
    """Sets the tokenizer's padding side and, when it has none, a pad token (eos) for the block only.

    transformers' batch collate function reads both once, when the batch iterator is built, so setting them for that
    moment leaves the caller's tokenizer as it was. Which token pads does not matter: the attention mask decides.
    """
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if saved_pad is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved_side, saved_pad


class ValueScoringPipeline(Pipeline):
    """Scores texts with a value-head model (task `"value-scoring"`), through `model.compute_sequence_scores`: the
    reward adapter and its `score` head when the model has one, else the value head; the LM head never runs.

    Inputs: a string, chat messages (a list of `{"role", "content"}` dicts, rendered with the tokenizer's chat
    template), or a list of either. For an encoder-decoder model, a dict `{"text": source, "text_target": target}`
    (or a list of them): the decoder start token and the target are the scored sequence, as `generate` returns it.

    Parameters (at construction or per call):
        normalize (`bool`): `(score - mean) / std` with the stored statistics (see `compute_sequence_scores`).
        return_values (`bool`): also return the value of every scored token and the tokens.
        truncation, max_length: passed to the tokenizer.
        padding_side (`"left"` / `"right"`): how batches (`batch_size` > 1) are padded; the score does not depend on it.
            Encoder-decoder batches are always right-padded, since the absolute positions of BART-like models would
            shift with left padding.

    Returns (per input):
        `{"score": float}` (a list of floats for a multi-label reward head); with `return_values=True` also
        `"values"` (one per scored token, padding excluded; a list per token for a multi-label head) and `"tokens"`
        (those tokens, as strings; for an encoder-decoder model, the decoder start token first).

    Raises:
        NotAValueHeadModelError: the model has no value head (a plain language model).
        InvalidInputError: an empty list of inputs; `EmptySequenceError` for a text that tokenizes to no tokens (an
            empty string); before anything runs. The model's own checks ([`check_model_inputs`]) apply to the rest.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, model, *args, **kwargs):
        if not isinstance(model, PreTrainedModelWrapper):
            seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            loader = "AutoModelForSeq2SeqLMWithValueHead" if seq2seq else "AutoModelForCausalLMWithValueHead"
            raise NotAValueHeadModelError(
                f"The {TASK!r} pipeline needs a value-head model, got {type(model).__name__}. Load it with "
                f"`transformers_vhead.{loader}.from_pretrained(path)` (a plain language model gets a fresh, untrained "
                "value head) and pass that model, or save it and pass the saved path."
            )
        super().__init__(model, *args, **kwargs)
        if self.tokenizer is None:
            raise ValueError(f"The {TASK!r} pipeline needs a tokenizer: pass `tokenizer=...`.")

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:  # transformers' own answer is an IndexError
            raise InvalidInputError(
                f"The {TASK!r} pipeline got an empty list: there is no text to score. Pass a string, chat messages, "
                "or a list of at least one of them."
            )
        return super().__call__(inputs, *args, **kwargs)

    @property
    def _is_seq2seq(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    def _sanitize_parameters(
        self, normalize=None, return_values=None, truncation=None, max_length=None, padding_side=None
    ) -> tuple[dict, dict, dict]:
        preprocess, forward, postprocess = {}, {}, {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if max_length is not None:
            preprocess["max_length"] = max_length
        if padding_side is not None:
            if padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
            preprocess["padding_side"] = padding_side
        if normalize is not None:
            forward["normalize"] = normalize
        if return_values is not None:
            forward["return_values"] = postprocess["return_values"] = return_values
        return preprocess, forward, postprocess

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        padding_side = "right" if self._is_seq2seq else preprocess_params.get("padding_side")
        with _collate_padding(self.tokenizer, padding_side):
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )

    def preprocess(self, inputs, truncation=None, max_length=None, padding_side=None) -> dict[str, torch.Tensor]:
        """Tokenizes one input (`padding_side` is read where batches are built, see `get_iterator`).

        Returns:
            `input_ids` and `attention_mask` `(1, seq)`, plus `decoder_input_ids` and `decoder_attention_mask` for an
            encoder-decoder model.
        """
        settings: dict[str, Any] = {"return_tensors": "pt", "return_token_type_ids": False}
        if truncation is not None:
            settings["truncation"] = truncation
        if max_length is not None:
            settings["max_length"] = max_length
        if self._is_seq2seq:
            return self._preprocess_seq2seq(inputs, settings)
        if isinstance(inputs, Chat):
            text = self.tokenizer.apply_chat_template(inputs.messages, tokenize=False)
            encoded = dict(self.tokenizer(text, add_special_tokens=False, **settings))  # the template writes them
            return _with_tokens(encoded, f"The chat {_shown(inputs.messages)}")
        if not isinstance(inputs, str):
            raise ValueError(
                f"The {TASK!r} pipeline scores a string or chat messages (a list of {{'role', 'content'}} dicts) with "
                f"a causal model, got {type(inputs).__name__}."
            )
        return _with_tokens(dict(self.tokenizer(inputs, **settings)), f"The text {_shown(inputs)}")

    def _preprocess_seq2seq(self, inputs, settings: dict) -> dict[str, torch.Tensor]:
        if not (isinstance(inputs, dict) and set(inputs) == SEQ2SEQ_KEYS):
            raise ValueError(
                f"{type(self.model).__name__} is an encoder-decoder model: it scores a target given a source, so pass "
                f"{{'text': source, 'text_target': target}} (or a list of them), got {type(inputs).__name__}."
            )
        source = self.tokenizer(inputs["text"], **settings)
        _with_tokens(source, f"The source text {_shown(inputs['text'])}")
        target = self.tokenizer(text_target=inputs["text_target"], **settings)["input_ids"]
        start = self.model.config.decoder_start_token_id
        if start is None:
            start = self.model.generation_config.decoder_start_token_id
        if start is None:
            raise ValueError(f"{type(self.model).__name__} has no decoder_start_token_id to start the target with.")
        decoder_input_ids = torch.cat([torch.full_like(target[:, :1], start), target], dim=-1)
        return {
            "input_ids": source["input_ids"],
            "attention_mask": source["attention_mask"],
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": torch.ones_like(decoder_input_ids),
        }

    def _forward(self, model_inputs: dict, normalize: bool = False, return_values: bool = False) -> dict:
        scored = "decoder_" if self._is_seq2seq else ""
        result = self.model.compute_sequence_scores(
            **model_inputs, normalize=normalize, return_token_scores=return_values
        )
        scores, token_scores = result if return_values else (result, None)
        return {
            "scores": scores,
            "token_scores": token_scores,
            "ids": model_inputs[f"{scored}input_ids"],
            "mask": model_inputs[f"{scored}attention_mask"],
        }

    def postprocess(self, model_outputs: dict, return_values: bool = False) -> dict[str, Any]:
        """Returns `{"score"}`, plus `"values"` and `"tokens"` of the attended tokens with `return_values`."""
        output: dict[str, Any] = {"score": model_outputs["scores"][0].tolist()}
        if return_values:
            attended = model_outputs["mask"][0].bool()
            output["values"] = model_outputs["token_scores"][0][attended].tolist()
            output["tokens"] = self.tokenizer.convert_ids_to_tokens(model_outputs["ids"][0][attended].tolist())
        return output


def _with_tokens(encoded, what: str):
    """`encoded`, unless its `input_ids` hold no token: then the input cannot be scored (there is no last token)."""
    if encoded["input_ids"].shape[-1] == 0:
        raise EmptySequenceError(
            f"{what} tokenizes to no tokens, so it has no last token to score: drop empty texts, or score them with "
            "a tokenizer that adds a BOS token."
        )
    return encoded


def _shown(value) -> str:
    """`value` for a message: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

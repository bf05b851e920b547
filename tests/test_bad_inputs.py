"""Bad inputs (issue 15, item 5): every entry point (`forward`, `compute_values`, the scores, the reference's log-probs,
`forward_with_reference`, the `value-scoring` pipeline) refuses inputs the model cannot run with a named error, before
the wrapped model runs, and takes what the bare model takes (a cache, a 4-D mask, `inputs_embeds`, boolean masks)."""

import copy

import pytest
import torch
from architectures import VOCAB_SIZE
from conftest import build_bare, policy_lora, save_reward_adapter
from transformers import pipeline

from transformers_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead
from transformers_vhead.compat import CACHE_NAME
from transformers_vhead.errors import (
    EmptySequenceError,
    InputDtypeError,
    InvalidInputError,
    TokenIdOutOfRangeError,
)
from transformers_vhead.peft_support import without_peft
from transformers_vhead.reference import create_reference_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A PEFT policy with a reward adapter (every entry point applies), in eval mode."""
    root = tmp_path_factory.mktemp("bad-inputs")
    build_bare("llama").save_pretrained(root / "llama")
    save_reward_adapter(root / "llama", root / "reward")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        root / "llama", peft_config=policy_lora(), reward_adapter=root / "reward"
    )
    return model.eval()


@pytest.fixture(scope="module")
def critic():
    torch.manual_seed(0)
    return AutoModelForCausalLMWithValueHead(build_bare("llama")).eval()


@pytest.fixture(scope="module")
def reference(critic):
    return create_reference_model(critic, num_shared_layers=1)


def good_inputs() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 5), generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def with_id(value: int) -> dict:
    inputs = good_inputs()
    inputs["input_ids"][1, 3] = value
    return inputs


def zero_row() -> dict:
    inputs = good_inputs()
    inputs["attention_mask"][1] = 0
    return inputs


# name -> (inputs, error class, what the message must say)
BAD = {
    "mask of fewer columns": (
        {**good_inputs(), "attention_mask": torch.ones(2, 4, dtype=torch.long)},
        InvalidInputError,
        r"attention_mask has shape \(2, 4\), but it must have the shape of input_ids, \(2, 5\)",
    ),
    "mask of other rows": (
        {**good_inputs(), "attention_mask": torch.ones(3, 5, dtype=torch.long)},
        InvalidInputError,
        r"attention_mask has shape \(3, 5\), but it must have the shape of input_ids, \(2, 5\)",
    ),
    "negative id": (with_id(-1), TokenIdOutOfRangeError, r"input_ids holds the token id -1, outside the model's vocab"),
    "id of the vocabulary's size": (
        with_id(VOCAB_SIZE),
        TokenIdOutOfRangeError,
        rf"input_ids holds the token id {VOCAB_SIZE}, outside the model's vocabulary \(ids 0 to {VOCAB_SIZE - 1}",
    ),
    "empty batch": (
        {key: value[:0] for key, value in good_inputs().items()},
        InvalidInputError,
        r"input_ids is an empty batch \(shape \(0, 5\)\)",
    ),
    "rows of no tokens": (
        {key: value[:, :0] for key, value in good_inputs().items()},
        EmptySequenceError,
        r"input_ids has rows of no tokens \(shape \(2, 0\)\)",
    ),
    "all-zero mask row": (zero_row(), EmptySequenceError, r"Row\(s\) \[1\] of attention_mask are all zeros"),
    "float ids": (
        {**good_inputs(), "input_ids": good_inputs()["input_ids"].float()},
        InputDtypeError,
        r"input_ids holds torch.float32 values, but token ids must be integers",
    ),
    "mask of fractions": (
        {**good_inputs(), "attention_mask": torch.full((2, 5), 0.5)},
        InvalidInputError,
        r"attention_mask is a float mask holding values other than 0 and 1 \(e.g. \[0.5, 0.5, 0.5\]\)",
    ),
    "1-D mask": (
        {**good_inputs(), "attention_mask": torch.ones(5, dtype=torch.long)},
        InvalidInputError,
        r"attention_mask must be 2-D \(batch, sequence\) .* got shape \(5,\)",
    ),
    "3-D mask": (
        {**good_inputs(), "attention_mask": torch.ones(2, 1, 5, dtype=torch.long)},
        InvalidInputError,
        r"attention_mask must be 2-D \(batch, sequence\) .* got shape \(2, 1, 5\)",
    ),
    "1-D ids": (
        {key: value[0] for key, value in good_inputs().items()},
        InvalidInputError,
        r"input_ids must be 2-D \(batch, sequence\), got shape \(5,\): add the batch dimension with input_ids\[None\]",
    ),
    "ids as a list": (
        {**good_inputs(), "input_ids": good_inputs()["input_ids"].tolist()},
        InputDtypeError,
        r"input_ids must be a torch tensor of token ids, got list",
    ),
}

ENTRY_POINTS = {
    "forward": lambda models, inputs: models["policy"](**inputs),
    "compute_values": lambda models, inputs: models["policy"].compute_values(**inputs),
    "compute_sequence_scores": lambda models, inputs: models["policy"].compute_sequence_scores(**inputs),
    "compute_reward_score": lambda models, inputs: models["policy"].compute_reward_score(**inputs),
    "compute_reference_logprobs": lambda models, inputs: models["policy"].compute_reference_logprobs(**inputs),
    "forward_with_reference": lambda models, inputs: models["critic"].forward_with_reference(
        models["reference"], **inputs, return_logprobs=True
    ),
}


class ForwardCalls:
    """Counts the calls of the bare language models' forwards (a pre-hook on each; removed on exit)."""

    def __init__(self, *models):
        self.models, self.count, self.handles = models, 0, []

    def __enter__(self):
        for model in self.models:
            bare = without_peft(model.pretrained_model)
            self.handles.append(bare.register_forward_pre_hook(lambda *args: setattr(self, "count", self.count + 1)))
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_a_named_error_before_the_model_runs(case, entry_point, policy, critic, reference):
    inputs, error, message = BAD[case]
    models = {"policy": policy, "critic": critic, "reference": reference}
    active = policy.active_adapters()
    with ForwardCalls(policy, critic, reference) as calls, pytest.raises(error, match=message):
        ENTRY_POINTS[entry_point](models, copy.copy(inputs))
    assert calls.count == 0
    assert policy.active_adapters() == active and not policy.training  # no switch was left behind


def test_the_error_classes_are_what_callers_of_the_bare_model_catch():
    assert issubclass(TokenIdOutOfRangeError, IndexError)  # the embedding's "index out of range in self"
    assert issubclass(InputDtypeError, TypeError)
    assert all(issubclass(error, ValueError) for error in (InvalidInputError, EmptySequenceError, InputDtypeError))


@pytest.mark.parametrize("case", ["negative id", "id of the vocabulary's size"])
def test_an_id_out_of_range_is_caught_as_the_bare_models_index_error(case, critic):
    """The bare Llama's embedding raises `IndexError: index out of range in self` (it names neither the id nor the
    argument); ours says both, and the same `except IndexError` catches it."""
    inputs = BAD[case][0]
    with pytest.raises(IndexError, match="index out of range"):
        critic.pretrained_model(**inputs)
    with pytest.raises(IndexError, match=r"input_ids holds the token id -?\d+, outside the model's vocabulary"):
        critic(**inputs)


def logits_of(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_what_the_bare_model_takes_is_taken_and_gives_its_logits(critic):
    inputs = good_inputs()
    bare = critic.pretrained_model
    expected = logits_of(bare, **inputs)
    mask = inputs["attention_mask"]
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].expand(2, 1, 5, 5)
    embeds = bare.get_input_embeddings()(inputs["input_ids"])
    accepted = {
        "bool mask": {**inputs, "attention_mask": mask.bool()},
        "float 0/1 mask": {**inputs, "attention_mask": mask.float()},
        "int32 ids": {**inputs, "input_ids": inputs["input_ids"].int()},
        "4-D mask": {**inputs, "attention_mask": causal},
        "inputs_embeds": {"inputs_embeds": embeds, "attention_mask": mask},
    }
    for name, case in accepted.items():
        assert torch.equal(logits_of(critic, **case), logits_of(bare, **case)), name
        assert torch.equal(logits_of(critic, **case), expected), name


def test_a_mask_with_inputs_embeds_is_checked_against_their_shape(critic):
    embeds = critic.get_input_embeddings()(good_inputs()["input_ids"])
    with pytest.raises(InvalidInputError, match=r"must have the shape of inputs_embeds \(batch, seq\), \(2, 5\)"):
        critic(inputs_embeds=embeds, attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_with_a_cache_the_mask_covers_past_and_new_tokens(critic):
    inputs = good_inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    bare = critic.pretrained_model
    with torch.no_grad():
        past = critic(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True).past_key_values
        bare_past = getattr(bare(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True), CACHE_NAME)
        step = critic(input_ids=ids[:, 3:], attention_mask=mask, past_key_values=past)
        bare_step = bare(input_ids=ids[:, 3:], attention_mask=mask, **{CACHE_NAME: bare_past})
    assert torch.equal(step.logits, bare_step.logits)
    with torch.no_grad():
        past = critic(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True).past_key_values
    with pytest.raises(InvalidInputError, match=r"at least 2 columns \(past \+ new tokens: a cache is given\)"):
        critic(input_ids=ids[:, 3:], attention_mask=mask[:, :1], past_key_values=past)


def test_a_seq2seq_models_decoder_inputs_are_checked_too():
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLMWithValueHead(build_bare("t5")).eval()
    inputs = good_inputs()
    decoder_ids = torch.randint(3, VOCAB_SIZE, (2, 4), generator=torch.Generator().manual_seed(1))
    with ForwardCalls(model) as calls:
        with pytest.raises(TokenIdOutOfRangeError, match=rf"decoder_input_ids holds the token id {VOCAB_SIZE},"):
            model(**inputs, decoder_input_ids=torch.cat([decoder_ids[:, :3], torch.full((2, 1), VOCAB_SIZE)], 1))
        with pytest.raises(InvalidInputError, match=r"decoder_attention_mask has shape \(2, 3\), but it must have"):
            model(**inputs, decoder_input_ids=decoder_ids, decoder_attention_mask=torch.ones(2, 3, dtype=torch.long))
        with pytest.raises(EmptySequenceError, match=r"Row\(s\) \[0\] of decoder_attention_mask are all zeros"):
            model.compute_sequence_scores(
                **inputs, decoder_input_ids=decoder_ids, decoder_attention_mask=torch.tensor([[0] * 4, [1] * 4])
            )
    assert calls.count == 0


@pytest.fixture(scope="module")
def scorer(critic):
    from transformers_vhead.demo import tiny_tokenizer

    return pipeline("value-scoring", model=critic, tokenizer=tiny_tokenizer())


@pytest.mark.parametrize(
    ("texts", "error", "message"),
    [
        ("", EmptySequenceError, r"The text '' tokenizes to no tokens"),
        (["good answer", "   "], EmptySequenceError, r"The text '   ' tokenizes to no tokens"),
        ([], InvalidInputError, r"got an empty list: there is no text to score"),
    ],
    ids=["empty text", "blank text in a batch", "empty list"],
)
def test_the_pipeline_refuses_what_it_cannot_score_before_the_model_runs(scorer, critic, texts, error, message):
    with ForwardCalls(critic) as calls, pytest.raises(error, match=message):
        scorer(texts, batch_size=2)
    assert calls.count == 0

"""`pipeline("value-scoring")`: the scores of `compute_sequence_scores`, batched or not, from every way of loading;
and `pipeline("text-generation")` on a PEFT policy."""

import pytest
import torch
from conftest import build_bare, policy_lora, populate_hub_cache, save_reward_adapter
from transformers import pipeline
from transformers.pipelines import get_supported_tasks
from transformers.utils import logging

from transformers_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, register
from transformers_vhead.errors import NotAValueHeadModelError
from transformers_vhead.pipelines import ValueScoringPipeline

TEXTS = ["the critic says this answer is good", "bad", "a policy learns and the reward model scores it"]
CHATS = [
    [{"role": "user", "content": "is this answer good"}, {"role": "assistant", "content": "it is very good"}],
    [{"role": "user", "content": "the answer"}],
]
CHAT_TEMPLATE = "{% for message in messages %}<s> {{ message['role'] }} {{ message['content'] }} </s> {% endfor %}"


@pytest.fixture
def critic():
    """A value-head Llama with a random (not zero) head, so every score differs; in eval mode, so `compute_values`
    applies no head dropout (wrapping an instance leaves the wrapper in train mode)."""
    return AutoModelForCausalLMWithValueHead.from_pretrained(build_bare("llama"), v_head_init_strategy="normal").eval()


@pytest.fixture
def scorer(critic, tokenizer):
    return pipeline("value-scoring", model=critic, tokenizer=tokenizer)


@pytest.fixture
def transformers_logs(caplog):
    """transformers' own log records (its root logger does not propagate outside CI)."""
    logging.enable_propagation()
    yield caplog
    logging.disable_propagation()


def expected_scores(model, tokenizer, texts, **kwargs) -> list:
    """`compute_sequence_scores` of each text alone, unpadded."""
    return [
        model.compute_sequence_scores(**tokenizer(text, return_tensors="pt"), **kwargs)[0].tolist() for text in texts
    ]


def scores(outputs) -> torch.Tensor:
    return torch.tensor([output["score"] for output in outputs])


def test_scores_equal_compute_sequence_scores(scorer, critic, tokenizer):
    single = scorer(TEXTS[0])
    outputs = scorer(TEXTS)

    assert isinstance(scorer, ValueScoringPipeline)
    assert set(single) == {"score"} and isinstance(single["score"], float)
    assert single["score"] == pytest.approx(expected_scores(critic, tokenizer, TEXTS[:1])[0], abs=1e-6)
    torch.testing.assert_close(
        scores(outputs), torch.tensor(expected_scores(critic, tokenizer, TEXTS)), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_scores_and_values_equal_unbatched(scorer, tokenizer, padding_side):
    unbatched = scorer(TEXTS, return_values=True)
    batched = scorer(TEXTS, batch_size=2, padding_side=padding_side, return_values=True)

    torch.testing.assert_close(scores(batched), scores(unbatched), atol=1e-5, rtol=0)
    for one, many in zip(unbatched, batched, strict=True):
        assert many["tokens"] == one["tokens"]  # the padding is left out
        torch.testing.assert_close(torch.tensor(many["values"]), torch.tensor(one["values"]), atol=1e-5, rtol=0)
    assert tokenizer.padding_side == "right"  # the padding side was set for that call only


def test_batching_without_a_pad_token_pads_with_eos_and_leaves_the_tokenizer_as_it_was(
    scorer, tokenizer, transformers_logs
):
    expected = scores(scorer(TEXTS))
    tokenizer.pad_token = None

    batched = scorer(TEXTS, batch_size=3, padding_side="left")

    torch.testing.assert_close(scores(batched), expected, atol=1e-5, rtol=0)
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    assert not [record for record in transformers_logs.records if record.levelno >= logging.WARNING]


def test_values_equal_compute_values_and_tokens_are_the_texts_tokens(scorer, critic, tokenizer):
    outputs = scorer(TEXTS, batch_size=2, return_values=True)

    for text, output in zip(TEXTS, outputs, strict=True):
        input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
        values = critic.compute_values(input_ids)[0]
        torch.testing.assert_close(torch.tensor(output["values"]), values, atol=1e-5, rtol=0)
        assert output["tokens"] == tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
        assert output["score"] == pytest.approx(output["values"][-1], abs=1e-5)  # the value head reads the last token


def test_normalize_uses_the_stored_statistics(scorer, critic):
    critic.config.score_mean, critic.config.score_std = 0.5, 2.0

    raw, normalized = scorer(TEXTS[0]), scorer(TEXTS[0], normalize=True, return_values=True)

    assert normalized["score"] == pytest.approx((raw["score"] - 0.5) / 2.0, abs=1e-6)
    assert normalized["values"][-1] == pytest.approx(normalized["score"], abs=1e-6)


def test_chat_messages_score_as_their_rendered_text(scorer, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    rendered = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in CHATS]

    single = scorer(CHATS[0], return_values=True)
    batched = scorer(CHATS, batch_size=2)

    assert single == scorer(rendered[0], return_values=True)
    assert single["tokens"][:3] == ["<s>", "<unk>", "is"]  # the template's tokens: "user" is not in the vocabulary
    torch.testing.assert_close(scores(batched), scores(scorer(rendered)), atol=1e-5, rtol=0)


def test_from_a_saved_path_and_from_a_hub_id(critic, tokenizer, tmp_path):
    critic.save_pretrained(tmp_path / "critic")
    tokenizer.save_pretrained(tmp_path / "critic")
    populate_hub_cache(tmp_path / "cache", "acme/critic", tmp_path / "critic")
    expected = torch.tensor(expected_scores(critic, tokenizer, TEXTS))

    from_path = pipeline("value-scoring", model=str(tmp_path / "critic"))
    from_hub = pipeline("value-scoring", model="acme/critic", model_kwargs={"cache_dir": str(tmp_path / "cache")})

    for scorer in (from_path, from_hub):
        assert type(scorer.model) is AutoModelForCausalLMWithValueHead and scorer.model.v_head_source.is_loaded
        torch.testing.assert_close(scores(scorer(TEXTS, batch_size=2)), expected, atol=1e-6, rtol=0)


def test_from_a_saved_peft_policy(llama_dir, tokenizer, tmp_path):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), v_head_init_strategy="normal"
    )
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")

    scorer = pipeline("value-scoring", model=str(tmp_path / "policy"))

    assert scorer.model.is_peft_model and scorer.model.v_head_source.is_loaded
    torch.testing.assert_close(
        scores(scorer(TEXTS, batch_size=2)), torch.tensor(expected_scores(policy, tokenizer, TEXTS)), atol=1e-5, rtol=0
    )


def test_registering_again_is_silent(transformers_logs):
    register()

    assert "value-scoring" in get_supported_tasks()
    assert "already registered" not in transformers_logs.text


@pytest.mark.parametrize("num_labels", [1, 2])
def test_a_reward_adapter_scores_instead_of_the_value_head(llama_dir, tokenizer, tmp_path, num_labels):
    adapter = save_reward_adapter(llama_dir, tmp_path / "reward-adapter", num_labels=num_labels)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), reward_adapter=adapter, v_head_init_strategy="normal"
    )
    scorer = pipeline("value-scoring", model=policy, tokenizer=tokenizer)

    outputs = scorer(TEXTS, batch_size=2, return_values=True)

    for text, output in zip(TEXTS, outputs, strict=True):
        inputs = tokenizer(text, return_tensors="pt")
        expected, token_scores = policy.compute_sequence_scores(**inputs, return_token_scores=True)
        torch.testing.assert_close(torch.tensor(output["score"]), expected[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(output["values"]), token_scores[0], atol=1e-5, rtol=0)
        if num_labels == 1:  # not the value head's value
            assert abs(output["score"] - policy.compute_values(**inputs)[0, -1].item()) > 1e-3
        else:
            assert len(output["score"]) == num_labels and len(output["values"][0]) == num_labels


@pytest.fixture
def seq2seq_dir(tokenizer, tmp_path):
    """A T5 value-head model with a random head, saved with the tokenizer."""
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(build_bare("t5"), v_head_init_strategy="normal")
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


def test_seq2seq_scores_the_target_after_the_decoder_start_token(seq2seq_dir, tokenizer):
    scorer = pipeline("value-scoring", model=str(seq2seq_dir))
    pairs = [{"text": text, "text_target": target} for text, target in zip(TEXTS, reversed(TEXTS), strict=True)]

    unbatched = scorer(pairs, return_values=True)
    batched = scorer(pairs, batch_size=2, padding_side="left", return_values=True)  # right-padded all the same

    assert type(scorer.model) is AutoModelForSeq2SeqLMWithValueHead
    for pair, one, many in zip(pairs, unbatched, batched, strict=True):
        target = tokenizer(pair["text_target"], return_tensors="pt")["input_ids"]
        decoder_input_ids = torch.cat([torch.zeros_like(target[:, :1]), target], dim=-1)  # T5 starts with pad (0)
        expected = scorer.model.compute_sequence_scores(
            **tokenizer(pair["text"], return_tensors="pt"), decoder_input_ids=decoder_input_ids
        )
        assert one["score"] == pytest.approx(expected[0].item(), abs=1e-6)
        assert one["tokens"] == ["<pad>", *tokenizer.convert_ids_to_tokens(target[0].tolist())]
        assert many["tokens"] == one["tokens"] and many["score"] == pytest.approx(one["score"], abs=1e-5)
        torch.testing.assert_close(torch.tensor(many["values"]), torch.tensor(one["values"]), atol=1e-5, rtol=0)


def test_seq2seq_model_given_a_string_says_to_pass_text_and_target(seq2seq_dir):
    scorer = pipeline("value-scoring", model=str(seq2seq_dir))

    with pytest.raises(ValueError, match="'text': source, 'text_target': target"):
        scorer("the answer is good")


def test_a_plain_language_model_is_refused_with_how_to_load_it(llama_dir, tokenizer):
    tokenizer.save_pretrained(llama_dir)

    with pytest.raises(NotAValueHeadModelError, match="AutoModelForCausalLMWithValueHead.from_pretrained") as error:
        pipeline("value-scoring", model=str(llama_dir))
    assert "LlamaForCausalLM" in str(error.value) and isinstance(error.value, ValueError)
    with pytest.raises(NotAValueHeadModelError, match="AutoModelForSeq2SeqLMWithValueHead"):
        pipeline("value-scoring", model=build_bare("t5"), tokenizer=tokenizer)


def test_text_generation_pipeline_on_a_peft_policy_equals_its_generate(llama_dir, tokenizer, transformers_logs):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    prompt = "the critic says this answer is"
    settings = {"max_new_tokens": 5, "do_sample": False}
    inputs = tokenizer(prompt, return_tensors="pt")
    expected = policy.generate(**inputs, **settings, pad_token_id=tokenizer.pad_token_id)[0]
    with policy.pretrained_model.disable_adapter():
        without_adapter = policy.generate(**inputs, **settings, pad_token_id=tokenizer.pad_token_id)[0]

    generator = pipeline("text-generation", model=policy, tokenizer=tokenizer)
    token_ids = generator(prompt, return_tensors=True, **settings)[0]["generated_token_ids"]
    text = generator(prompt, return_full_text=False, **settings)[0]["generated_text"]

    assert token_ids == expected.tolist() and token_ids != without_adapter.tolist()  # the adapter generates
    assert text == tokenizer.decode(expected[inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "is not supported for text-generation" not in transformers_logs.text

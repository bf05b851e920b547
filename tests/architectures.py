"""The architecture matrix: tiny configs of each model family the tests run on.

Each entry builds a config with 2 layers, hidden size 32 (or the family's names for them) and `VOCAB_SIZE` tokens,
so every test model is a few hundred KB and loads in milliseconds.
"""

from __future__ import annotations

import transformers

VOCAB_SIZE = 96
_ATTN = {"num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}
_GQA = {**_ATTN, "num_key_value_heads": 2}

# family -> (config class name, keyword arguments)
CAUSAL_FAMILIES = {
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", {**_GQA, "sliding_window": 4}),
    "qwen2": ("Qwen2Config", _GQA),
    "qwen3": ("Qwen3Config", {**_GQA, "head_dim": 8}),
    "gemma": ("GemmaConfig", {**_GQA, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**_GQA, "head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 5.0}),
    "phi3": ("Phi3Config", _GQA),
    # OPT projects its output to word_embed_proj_dim, which is what the value head reads
    "opt": (
        "OPTConfig",
        {
            "hidden_size": 32,
            "word_embed_proj_dim": 16,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
    ),
    "gpt_neox": ("GPTNeoXConfig", _ATTN),
    "bloom": ("BloomConfig", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "falcon": ("FalconConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}),
    "gptj": ("GPTJConfig", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 64}),
    "olmo2": ("Olmo2Config", _GQA),
    # logits scaled after the LM head: the wrapper must return the model's own logits, not lm_head(h)
    "cohere": ("CohereConfig", {**_GQA, "logit_scale": 0.5}),
    "granite": ("GraniteConfig", {**_GQA, "logits_scaling": 2.0}),
}

_BART_LIKE = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
}

SEQ2SEQ_FAMILIES = {
    "t5": (
        "T5Config",
        {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0},
    ),
    "bart": ("BartConfig", _BART_LIKE),
    "pegasus": ("PegasusConfig", {**_BART_LIKE, "decoder_start_token_id": 0}),
}

FAMILIES = [*CAUSAL_FAMILIES, *SEQ2SEQ_FAMILIES]

# Token ids every family shares, inside the vocabulary.
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers")


def tiny_config(family: str, num_layers: int = 2) -> transformers.PreTrainedConfig:
    """The tiny config of `family` (with `num_layers` layers in each stack), with dropout off so train and eval
    forwards agree."""
    class_name, kwargs = {**CAUSAL_FAMILIES, **SEQ2SEQ_FAMILIES}[family]
    kwargs = {**kwargs, **{key: num_layers for key in _LAYER_COUNTS if key in kwargs}}
    config = getattr(transformers, class_name)(vocab_size=VOCAB_SIZE, **SPECIAL_TOKENS, **kwargs)
    for name in (
        "dropout",
        "attention_dropout",
        "hidden_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "dropout_rate",
        "activation_dropout",
        "classifier_dropout",
        "summary_first_dropout",
    ):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config

"""Where the model runs: `device_map` (accelerate's dispatch, CPU + disk offload), torch.compile, and TRL's 8/4-bit
PEFT route (`peft.prepare_model_for_kbit_training` before the adapter).

This machine has no GPU, so the placements that mean something here are "auto" and CPU + disk offload through
accelerate's hooks. Offloaded weights are the checkpoint's bytes, read back and run through the same CPU kernels, so
values and logits equal a plain load bit-for-bit (`torch.equal`). Compiled calls are compared with eager at 1e-5:
compiling may fuse and reorder float operations (the backend used here, dynamo's "eager", runs the traced graph
as it is; `benchmarks/graph_breaks.py` measures inductor).
"""

import importlib.util

import pytest
import torch
from conftest import build_bare, model_inputs, policy_lora
from torch._dynamo.testing import CompileCounter
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.errors import DeviceMapError

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
NEEDS_BITSANDBYTES = pytest.mark.skipif(
    not HAS_BITSANDBYTES,
    reason="bitsandbytes is not installed: it is the real 8/4-bit backend of this route, and runs on CPU (0.50 does); "
    "`pip install bitsandbytes` to run these tests",
)
GC_KWARGS = {"use_reentrant": True, "preserve_rng_state": False}


@pytest.fixture
def value_head_dir(llama_dir, tmp_path):
    """A saved value-head checkpoint (head seeded differently from any fresh one, so a fresh head cannot pass)."""
    torch.manual_seed(123)
    path = tmp_path / "value-head"
    AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir).save_pretrained(path)
    return path


def load(path, seed: int = 0, **kwargs):
    """Seeded, so that a fresh head is the same in every load."""
    torch.manual_seed(seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(path, **kwargs).eval()


def half_the_model_in_memory() -> dict:
    """A `max_memory` that holds about half of the tiny model, so that "auto" sends the rest to disk."""
    return {"cpu": sum(parameter.nbytes for parameter in build_bare("llama").parameters()) // 2}


LAYER_ON_DISK = {
    "pretrained_model.model.embed_tokens": "cpu",
    "pretrained_model.model.layers.0": "cpu",
    "pretrained_model.model.layers.1": "disk",
    "pretrained_model.model.norm": "cpu",
    "pretrained_model.model.rotary_emb": "cpu",
    "pretrained_model.lm_head": "cpu",
    "v_head": "cpu",
}
PLACEMENTS = {
    "auto, half on disk": dict(device_map="auto", max_memory=half_the_model_in_memory()),
    "a layer on disk": dict(device_map=LAYER_ON_DISK),
    "everything on disk": dict(device_map={"": "disk"}),
    "the head alone on disk": dict(device_map={"pretrained_model": "cpu", "v_head": "disk"}),
}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("source", ["value-head checkpoint", "plain LM"])
def test_offloaded_model_equals_a_plain_load(placement, source, llama_dir, value_head_dir, tmp_path):
    path = value_head_dir if source == "value-head checkpoint" else llama_dir
    plain = load(path)
    placed = load(path, offload_folder=tmp_path / "offload", **PLACEMENTS[placement])
    inputs = model_inputs("llama")

    with torch.no_grad():
        expected, output = plain(**inputs), placed(**inputs)
        values = placed.compute_values(**inputs)

    assert torch.equal(output.logits, expected.logits) and torch.equal(output.value, expected.value)
    assert torch.equal(values, expected.value)
    assert output.value.device.type == output.logits.device.type == "cpu"
    device_map = getattr(placed, "hf_device_map", {})  # set by accelerate's dispatch (more than one device, or disk)
    assert placed.v_head_source.is_loaded == (source == "value-head checkpoint")
    if source == "value-head checkpoint":  # the checkpoint's head, read from the offload folder when it is on disk
        assert "disk" in device_map.values()
        assert torch.equal(values, load(value_head_dir).compute_values(**inputs))
    else:  # a fresh head is not in the checkpoint, so it cannot be offloaded: it stays in memory, with the LM head
        assert device_map.get("v_head", "cpu") == "cpu" and placed.v_head.summary.weight.device.type == "cpu"
        assert "disk" in device_map.values() or placement == "the head alone on disk"  # then all in memory


def test_auto_placement_names_our_modules_and_keeps_decoder_layers_whole(llama_dir, tmp_path):
    model = load(llama_dir, offload_folder=tmp_path / "offload", **PLACEMENTS["auto, half on disk"])

    assert model._no_split_modules == {"LlamaDecoderLayer"}
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert all(key == "v_head" or key.startswith("pretrained_model") for key in model.hf_device_map)
    layer_keys = [key for key in model.hf_device_map if ".layers." in key]
    assert all(key.count(".") == 3 for key in layer_keys), layer_keys  # pretrained_model.model.layers.<i>, whole


def test_auto_on_a_cpu_only_machine_dispatches_nothing_as_for_the_bare_model(llama_dir):
    model, bare = load(llama_dir, device_map="auto"), AutoModelForCausalLM.from_pretrained(llama_dir, device_map="auto")

    assert not hasattr(model, "hf_device_map") and not hasattr(bare, "hf_device_map")  # one device: no hooks
    with torch.no_grad():
        assert torch.equal(model(**model_inputs("llama")).value, load(llama_dir)(**model_inputs("llama")).value)


def test_value_only_call_under_offload_skips_the_lm_head_and_offloads_again(llama_dir, tmp_path):
    """compute_values ends the forward by an exception from the decoder's hook: accelerate's hooks of the modules that
    ran have finished by then, so every offloaded weight is back on disk (meta) afterwards."""
    model = load(
        llama_dir, offload_folder=tmp_path / "offload", device_map={"pretrained_model": "disk", "v_head": "cpu"}
    )
    lm_head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: lm_head_calls.append(1))
    inputs = model_inputs("llama")

    with torch.no_grad():
        values = model.compute_values(**inputs)
        offloaded = [parameter.device.type for parameter in model.pretrained_model.parameters()]
        output = model(**inputs)

    assert lm_head_calls == [1]  # the full forward's only
    assert set(offloaded) == {"meta"}
    assert torch.equal(values, output.value) and torch.equal(values, load(llama_dir).compute_values(**inputs))


def test_device_map_dict_is_not_changed_by_loading(llama_dir, tmp_path):
    device_map = {"": "disk"}

    load(llama_dir, offload_folder=tmp_path / "offload", device_map=device_map)

    assert device_map == {"": "disk"}


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        (
            {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"},
            r"device_map names \['model.embed_tokens', 'model.layers', 'model.norm', 'lm_head'\], which are not "
            r"modules of AutoModelForCausalLMWithValueHead.*needs `pretrained_model.` before each key, e.g. "
            r"'pretrained_model.model.embed_tokens', and an entry for 'v_head'",
        ),
        (
            {"pretrained_model.model": "cpu", "pretrained_model.lm_head": "disk"},
            r"device_map gives no device for the value head: add 'v_head': <device>, the device of the wrapped model's "
            r"LM head",
        ),
        (
            {"pretrained_model": "cpu"},  # one device: transformers would load it, with the head wherever
            r"device_map gives no device for the value head",
        ),
    ],
    ids=["bare model's names", "no v_head, offloaded", "no v_head, one device"],
)
def test_device_map_that_does_not_place_our_modules_is_refused_before_loading(device_map, message, llama_dir):
    with pytest.raises(DeviceMapError, match=message):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, device_map=device_map, offload_folder="unused")
    assert issubclass(DeviceMapError, ValueError)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLMWithValueHead(build_bare("llama")).eval()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_model_is_one_graph_and_matches_eager(model):
    """`fullgraph=True` fails on any graph break: the capture hook, its context manager, the stop after the decoder and
    the output class all trace (the bare model has no break either)."""
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs)
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        output, value_only = compiled(**inputs), compiled(**inputs, return_logits=False)

    torch.testing.assert_close(output.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.value, expected.value, rtol=0, atol=1e-5)
    torch.testing.assert_close(value_only.value, expected.value, rtol=0, atol=1e-5)
    assert value_only.logits is None


@pytest.mark.usefixtures("fresh_dynamo")
def test_model_compile_in_place_compiles_compute_values(model):
    """`torch.compile(model).compute_values` is the module's own method, whose `self(...)` is the eager model;
    `model.compile()` compiles the module in place, so `compute_values` (and pipelines, generate) run compiled."""
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = model.compute_values(**inputs)
        counter = CompileCounter()
        model.compile(backend=counter, fullgraph=True, dynamic=False)
        values = model.compute_values(**inputs)

    assert counter.frame_count == 1  # compiled, as one graph
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_hook_left_on_a_wrapped_decoder_keeps_other_compiled_calls_whole(model):
    """The capture hook stays on the decoder. A compiled call that is not ours while none of ours runs (the wrapped
    bare model, or transformers' compiled forward of a static-cache `generate`, which uses `fullgraph=True`) traces it
    as a no-op; a decoder compiled on its own inside an eager call of ours still hands that call its hidden state."""
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected, expected_logits = model.compute_values(**inputs), model.pretrained_model(**inputs).logits
        bare = torch.compile(model.pretrained_model, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(bare(**inputs).logits, expected_logits, rtol=0, atol=1e-5)
        model.pretrained_model.get_decoder().compile(backend="eager", dynamic=False)
        values = model.compute_values(**inputs)

    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)


def trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def assert_prepared_for_kbit_training(model, lora_class: type, gradient_checkpointing: bool = True) -> None:
    """What `peft.prepare_model_for_kbit_training` leaves, as TRL's route: the base frozen (only LoRA and our head
    train), its non-quantized weights in fp32, gradient checkpointing with the given kwargs, and embeddings whose
    output requires grad (so checkpointed layers get gradients); and the LoRA layers are bitsandbytes' kind."""
    import bitsandbytes as bnb

    base = model.pretrained_model.get_base_model()
    quantized = (bnb.nn.Int8Params, bnb.nn.Params4bit)
    assert {name for name in trainable_names(model) if "lora_" not in name} == {
        "v_head.summary.weight",
        "v_head.summary.bias",
    }
    assert {p.dtype for p in base.parameters() if not isinstance(p, quantized)} == {torch.float32}  # loaded in bf16
    assert any(isinstance(p, quantized) for p in base.parameters())
    assert type(model.v_head.summary) is torch.nn.Linear and model.v_head.summary.weight.dtype == torch.float32
    assert isinstance(base.model.layers[0].self_attn.q_proj, lora_class)
    assert base.is_gradient_checkpointing == gradient_checkpointing
    if gradient_checkpointing:
        for layer in base.model.layers:
            assert layer._gradient_checkpointing_func.keywords == GC_KWARGS
    assert base.get_input_embeddings()(torch.tensor([[3, 4]])).requires_grad == gradient_checkpointing


@NEEDS_BITSANDBYTES
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_with_peft_config_is_prepared_for_kbit_training(bits, llama_dir):
    """A real bitsandbytes load on CPU: the quantization state is what transformers sets, on our model (which
    transformers loads), and we hand it to the wrapped LM, where peft reads it."""
    from peft.tuners.lora import bnb as lora_bnb

    quantization = BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir,
        dtype=torch.bfloat16,
        quantization_config=quantization,
        peft_config=policy_lora(init_lora_weights=True),
        gradient_checkpointing_kwargs=GC_KWARGS,
    )

    assert_prepared_for_kbit_training(model, lora_bnb.Linear8bitLt if bits == 8 else lora_bnb.Linear4bit)
    model.train()
    output = model(**model_inputs("llama"))
    output.value.sum().backward()
    assert torch.isfinite(output.value).all() and output.value.dtype == torch.float32
    assert model.v_head.summary.weight.grad is not None
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_B" in name)


@NEEDS_BITSANDBYTES
def test_quantized_instance_with_peft_config_and_no_gradient_checkpointing(llama_dir):
    """TRL's other route (a quantized model instance), with `use_gradient_checkpointing=False`: prepared, without it."""
    from peft.tuners.lora import bnb as lora_bnb

    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        base, peft_config=policy_lora(), use_gradient_checkpointing=False, gradient_checkpointing_kwargs=GC_KWARGS
    )

    assert_prepared_for_kbit_training(model, lora_bnb.Linear8bitLt, gradient_checkpointing=False)


@NEEDS_BITSANDBYTES
def test_saved_adapter_loads_onto_a_quantized_base_with_bitsandbytes_lora_layers(llama_dir, tmp_path):
    """The adapter route: peft reads the quantization state on the language model it loads the adapter into; the
    saved head comes back as it was (fp32, not quantized). Nothing is prepared for training, as in TRL."""
    from peft.tuners.lora import bnb as lora_bnb

    torch.manual_seed(7)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    policy.save_pretrained(tmp_path / "policy")

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        tmp_path / "policy", quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )

    base = model.pretrained_model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj, lora_bnb.Linear8bitLt)
    assert model.v_head_source.is_loaded and type(model.v_head.summary) is torch.nn.Linear
    assert torch.equal(model.v_head.summary.weight, policy.v_head.summary.weight)
    assert not base.is_gradient_checkpointing


def test_without_quantization_kbit_preparation_is_not_done(llama_dir):
    """As TRL: the keywords are taken out of the loading keywords (they reach no config), and nothing is prepared."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir,
        dtype=torch.bfloat16,
        peft_config=policy_lora(),
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs=GC_KWARGS,
    )
    base = model.pretrained_model.get_base_model()

    assert not base.is_gradient_checkpointing
    assert base.model.norm.weight.dtype == torch.bfloat16  # not upcast
    assert not base.get_input_embeddings()(torch.tensor([[3, 4]])).requires_grad
    assert not hasattr(model.config.text_config, "use_gradient_checkpointing")
    assert not hasattr(model.config.text_config, "gradient_checkpointing_kwargs")
    assert {name for name in trainable_names(model) if "lora_" not in name} == {
        "v_head.summary.weight",
        "v_head.summary.bias",
    }


@NEEDS_BITSANDBYTES
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="bitsandbytes 4-bit with its CUDA kernels needs a CUDA GPU, and this machine has none; the CPU tests above "
    "run the same route on bitsandbytes' CPU backend",
)
def test_real_4bit_training_step_on_a_gpu(llama_dir):
    from peft.tuners.lora import bnb as lora_bnb

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir,
        dtype=torch.bfloat16,
        quantization_config=quantization,
        device_map={"": 0},
        peft_config=policy_lora(init_lora_weights=True),
        gradient_checkpointing_kwargs=GC_KWARGS,
    )
    base = model.pretrained_model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj, lora_bnb.Linear4bit)
    assert base.is_gradient_checkpointing and model.v_head.summary.weight.device.type == "cuda"
    model.train()
    inputs = {key: value.cuda() for key, value in model_inputs("llama").items()}
    output = model(**inputs)
    output.value.sum().backward()
    assert torch.isfinite(output.value).all() and model.v_head.summary.weight.grad is not None

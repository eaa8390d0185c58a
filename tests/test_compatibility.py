"""A spliced model with the transformers clients users reach for: what works keeps working, what cannot work
exactly is refused by name (README, "Compatibility")."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache, Trainer, TrainingArguments, pipeline

from lorsa_hf import load_spliced, spliced_layers
from tests.conftest import make_lorsa
from tests.training.conftest import make_model, make_tokenizer

LAYERS = [0, 2]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def spliced(arch: str, tokenizer, seed: int = 0):
    model = make_model(arch, tokenizer, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    lorsa = make_lorsa(model.config, LAYERS, seed=seed)
    return lorsa.splice(model), lorsa


def prompt(tokenizer) -> torch.Tensor:
    return tokenizer(["Anna met Bob and"], return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------ refused by name


def test_output_attentions_keeps_one_entry_per_layer(arch, tokenizer):
    model, _ = spliced(arch, tokenizer)
    model.set_attn_implementation("eager")
    ids = prompt(tokenizer)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert len(attentions) == model.config.num_hidden_layers
    assert attentions[0] is None and attentions[2] is None
    assert tuple(attentions[1].shape) == (1, model.config.num_attention_heads, ids.shape[1], ids.shape[1])


def test_splicing_into_a_disk_offloaded_attention_is_refused(tokenizer, tmp_path):
    make_model("llama", tokenizer).save_pretrained(tmp_path / "base")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in (1, 2)})
    device_map["model.layers.0"] = "disk"
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    lorsa = make_lorsa(model.config, LAYERS)
    before = lorsa.layer(0).W_V.detach().clone()
    with pytest.raises(ValueError, match="Layer 0's attention is offloaded"):
        lorsa.splice(model, move=True)
    assert torch.equal(lorsa.layer(0).W_V, before) and spliced_layers(model) == []


@pytest.mark.parametrize("top_k", [2.5, True, "8"])
def test_a_top_k_of_the_wrong_type_is_refused(tokenizer, top_k):
    _, lorsa = spliced("llama", tokenizer)
    with pytest.raises(TypeError, match="top_k must be an integer number of heads"):
        lorsa(torch.randn(1, 4, 32), layer=0, top_k=top_k)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_inputs_give_empty_outputs(tokenizer, shape):
    _, lorsa = spliced("llama", tokenizer)
    output = lorsa(torch.randn(*shape, 32), layer=0)
    assert tuple(output.hidden_states.shape) == (*shape, 32)
    assert tuple(output.z.shape) == (*shape, 128) and tuple(output.top_k_indices.shape) == (*shape, 8)
    assert output.activations().shape == output.z.shape


# ------------------------------------------------------------------------------------------ smaller client issues


def test_a_peft_model_is_spliced_inside_and_the_repr_shows_the_lorsa(arch, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = make_model(arch, tokenizer)
    targets = ["dense_h_to_4h"] if arch == "gpt_neox" else ["gate_proj", "up_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=targets))
    lorsa = make_lorsa(base.config, LAYERS)
    assert lorsa.splice(peft_model) is peft_model
    assert spliced_layers(peft_model) == LAYERS
    assert "n_ov_heads=128, n_qk_heads=4, d_qk_head=8, top_k=8" in repr(lorsa.layer(0))
    assert peft_model.config.lorsa_splice[0]["layers"] == LAYERS
    lorsa.unsplice(peft_model)
    assert spliced_layers(peft_model) == []


# ------------------------------------------------------------------------------------------ clients that work


def test_the_text_generation_pipeline_matches_generate(tokenizer):
    model, _ = spliced("llama", tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("Anna met Bob and", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    ids = model.generate(prompt(tokenizer), max_new_tokens=5, do_sample=False)
    assert text == tokenizer.decode(ids[0], skip_special_tokens=True)


def test_beams_sampling_and_assisted_generation(arch, tokenizer):
    model, _ = spliced(arch, tokenizer)
    ids = prompt(tokenizer)
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
        beams = model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
        assistant = make_model(arch, tokenizer, seed=1)
        assistant.generation_config.pad_token_id = tokenizer.pad_token_id
        assisted = model.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=assistant)
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
        torch.manual_seed(0)
        sampled_again = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    assert torch.equal(assisted, greedy)
    assert beams.shape == (2, ids.shape[1] + 6)
    assert torch.equal(sampled, sampled_again)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    ids = prompt(tokenizer)
    gradients = []
    for checkpointing in (False, True):
        model, lorsa = spliced("llama", tokenizer)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        gradients.append(lorsa.layer(2).W_O.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=1e-6)


def test_accelerate_prepare_keeps_the_outputs(tokenizer):
    from accelerate import Accelerator

    model, _ = spliced("llama", tokenizer)
    ids = prompt(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
        prepared = Accelerator(cpu=True).prepare(model)
        assert torch.equal(prepared(ids).logits, before)


def test_peft_lora_on_the_mlp_and_on_the_lorsa_parameters(tokenizer):
    from peft import LoraConfig, get_peft_model

    model, _ = spliced("llama", tokenizer)
    ids = prompt(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
    config = LoraConfig(
        r=2, target_modules=["gate_proj"], target_parameters=["self_attn.lorsa.W_V", "self_attn.lorsa.W_O"]
    )
    peft_model = get_peft_model(model, config)
    names = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lorsa" in name for name in names) and any("gate_proj" in name for name in names)
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, before)  # LoRA B starts at zero
    peft_model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for name, p in peft_model.named_parameters() if p.requires_grad)


def _trainer(model, output_dir, tokenizer, max_steps: int) -> Trainer:
    rows = tokenizer(["Anna met Bob and they left."] * 8, return_tensors="pt").input_ids
    data = [{"input_ids": row, "labels": row} for row in rows]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, logging_strategy="no",
    )
    return Trainer(model=model, args=args, train_dataset=data)


def test_hf_trainer_checkpoints_load_as_the_base_and_resume_exactly(tokenizer, tmp_path):
    def frozen_lorsa_model():
        model, lorsa = spliced("llama", tokenizer)
        lorsa.requires_grad_(False)
        return model

    straight = frozen_lorsa_model()
    _trainer(straight, tmp_path / "straight", tokenizer, 4).train()
    resumed = frozen_lorsa_model()
    resume = str(tmp_path / "straight" / "checkpoint-2")  # as a run killed after its first checkpoint left it
    _trainer(resumed, tmp_path / "resumed", tokenizer, 4).train(resume_from_checkpoint=resume)
    for (name, ours), theirs in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
    checkpoint = tmp_path / "straight" / "checkpoint-4"
    ids = prompt(tokenizer)
    with torch.no_grad():
        assert torch.equal(load_spliced(checkpoint).eval()(ids).logits, straight.eval()(ids).logits)
    clean = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert spliced_layers(clean) == []


def test_lm_eval_hflm_scores_the_spliced_model(tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, _ = spliced("llama", tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=64)
    request = Instance("loglikelihood", {}, ("Anna met Bob", " and"), 0)
    (logprob, _), = lm.loglikelihood([request], disable_tqdm=True)
    context, continuation = tokenizer("Anna met Bob").input_ids, tokenizer(" and").input_ids
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = copy.deepcopy(model)(ids).logits.log_softmax(-1)[0]
    expected = sum(logits[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_nnsight_traces_reads_and_edits_the_lorsa(tokenizer):
    """nnsight wraps the spliced model like any module tree: the Lorsa layer's output is readable inside a trace
    (it is what the replaced attention returns), and an edit to it changes the logits exactly as a hook would."""
    from nnsight import NNsight

    model, _ = spliced("llama", tokenizer)
    ids = prompt(tokenizer)
    wrapped = NNsight(model)
    with torch.no_grad(), wrapped.trace(ids):
        lorsa_output = wrapped.model.layers[0].self_attn.lorsa.output.save()
        attention_output = wrapped.model.layers[0].self_attn.output.save()
        logits = wrapped.output.logits.save()
    with torch.no_grad(), wrapped.trace(ids):
        wrapped.model.layers[0].self_attn.output[0][:] = 0
        edited = wrapped.output.logits.save()

    assert torch.equal(lorsa_output.hidden_states, attention_output[0])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=0)
    attention = model.model.layers[0].self_attn
    handle = attention.register_forward_hook(lambda module, args, output: (torch.zeros_like(output[0]), *output[1:]))
    try:
        with torch.no_grad():
            hooked = model(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited, hooked, rtol=0, atol=0)
    assert (edited - logits).abs().max() > 1e-2


def test_torch_compile_fullgraph_gives_the_eager_logits(tokenizer):
    """Under torch.compile the layer takes the dense path (the same function, which the compiler can trace)."""
    model, _ = spliced("llama", tokenizer)
    batch = tokenizer(["Anna met Bob and", "Bob"], return_tensors="pt", padding=True)
    with torch.no_grad():
        eager = model(**batch).logits
        compiled = torch.compile(model, fullgraph=True)(**batch).logits
    keep = batch.attention_mask.bool()
    torch.testing.assert_close(compiled[keep], eager[keep], rtol=0, atol=1e-4)


def test_torch_compile_fullgraph_decodes_with_a_static_cache_as_eager(tokenizer):
    """Compiled decoding as transformers runs it: the prompt eagerly into a StaticCache, then each step through
    `torch.compile(model.forward, fullgraph=True)`; the same tokens and logits as eager decoding."""
    model, _ = spliced("llama", tokenizer)
    ids = prompt(tokenizer)

    def decode(forward, steps: int = 3) -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
        logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        for step in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            position = torch.tensor([[ids.shape[1] + step]])
            logits.append(forward(input_ids=token, past_key_values=cache, position_ids=position).logits[:, -1])
        return torch.stack(logits, 1)

    with torch.no_grad():
        eager = decode(model.forward)
        compiled = decode(torch.compile(model.forward, fullgraph=True))
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)

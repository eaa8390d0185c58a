"""PEFT's own LoRA on a model with a Lorsa spliced in: on the MLP projections (`target_modules`) and on the
Lorsa's W_V / W_O (`target_parameters`), trained, saved as an adapter and reloaded onto a freshly spliced model.
(There is no `PeftModel.from_pretrained(base, lorsa_repo)`: PEFT registers only its own methods; see README.)"""

from __future__ import annotations

import peft
import pytest
import torch

from tests.conftest import VOCAB, make_base, make_lorsa

LAYER = 1
TARGETS = {
    "mlp": {"target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "lorsa": {"target_modules": [], "target_parameters": ["lorsa.W_V", "lorsa.W_O"]},
}


def spliced_model():
    """The same tiny Llama with the same Lorsa spliced into layer 1, every time."""
    model = make_base("llama", seed=0)
    make_lorsa(model.config, [LAYER], seed=1).splice(model)
    return model


def batch() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_lora_trains_saves_and_reloads_on_a_spliced_model(target, tmp_path):
    model = spliced_model()
    originals = list(model.parameters())
    frozen = [value.detach().clone() for value in originals]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **TARGETS[target])
    tuned = peft.get_peft_model(model, config)
    trainable = [name for name, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    if target == "lorsa":
        assert all(f"layers.{LAYER}.self_attn.lorsa" in name for name in trainable)
    ids = batch()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for value, before in zip(originals, frozen, strict=True):  # base model and Lorsa untouched: the adapter learned
        assert not value.requires_grad and torch.equal(value.detach(), before)
    tuned.eval()
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits

    tuned.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = peft.PeftModel.from_pretrained(spliced_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        plain = spliced_model()(input_ids=ids).logits
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapter is what changed the outputs

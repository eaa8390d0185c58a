"""The activation store: an exact round trip, refusal of damaged shards by name, refusal of recipes it does not
match, the disk budget, a resumable build, and training from it equal to training live, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorsa_hf.training import LorsaTrainer, recipe_from_dict
from lorsa_hf.training.activations import ActivationSource, load_base_model
from lorsa_hf.training.data import batches, packer, text_sources
from lorsa_hf.training.store import ActivationStore, StoreError, build_store, check_disk, planned_bytes

from ..conftest import tiny_recipe_dict


def store_recipe(files, tmp_path, **store):
    """The tiny recipe (2 layers, 8 x 32-token rows a step, 12 steps) with a store at tmp_path / 'store'."""
    values = tiny_recipe_dict(files, tmp_path / "run", training={"max_steps": 12, "eval_sequences": 16})
    values["store"] = {"path": str(tmp_path / "store"), "shard_mb": 0.05, **store}
    return recipe_from_dict(values)


@pytest.fixture(scope="module")
def built(tiny_files, tmp_path_factory):
    """One store, built once for the module (read-only: tests that damage it work on a copy)."""
    root = tmp_path_factory.mktemp("store")
    recipe = store_recipe(tiny_files, root)
    build_store(recipe, progress=False)
    return recipe, Path(recipe.store.path)


def copy_store(built, tmp_path) -> Path:
    folder = tmp_path / "store"
    shutil.copytree(built[1], folder)
    return folder


def test_round_trip_is_exact(built):
    recipe, folder = built
    store = ActivationStore(folder)
    model, tokenizer = load_base_model(recipe)
    live = ActivationSource(model, [0, 1])
    train, heldout = text_sources(recipe.data)
    expected = {
        "train": list(batches(packer(train, tokenizer, recipe.data), 8))[:12],
        "heldout": list(batches(packer(heldout, tokenizer, recipe.data), 8))[:2],
        "calibration": list(batches(packer(train, tokenizer, recipe.data), 8))[:1],
    }
    for split, rows in expected.items():
        stored = list(store.batches(split))
        assert len(stored) == len(rows)
        for (ids, attention, state), (s_ids, s_attention, s_state) in zip(rows, stored, strict=True):
            assert torch.equal(ids, s_ids) and torch.equal(attention, s_attention) and state == s_state
            reference, found = live(ids, attention), store.activations([0, 1], prefer=split)(ids, attention)
            for layer in (0, 1):
                assert torch.equal(found[layer].inputs, reference[layer].inputs)
                assert torch.equal(found[layer].outputs, reference[layer].outputs)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["layers"] == [0, 1] and manifest["dtype"] == "float32"
    assert manifest["tokens"] == {"calibration": 8 * 32, "heldout": 16 * 32, "train": 12 * 8 * 32}
    assert manifest["model"]["name"] == recipe.model.name and manifest["data"]["context_length"] == 32
    assert len(manifest["splits"]["train"]["shards"]) > 1  # shard_mb is small enough for several shards


def test_bfloat16_store_holds_the_activations_rounded_once(built, tiny_files, tmp_path):
    recipe = store_recipe(tiny_files, tmp_path, dtype="bfloat16", train_tokens=256)
    build_store(recipe, progress=False)
    ids, attention, _ = next(ActivationStore(recipe.store.path).batches("train"))
    shard = load_file(str(tmp_path / "store" / "train-00000.safetensors"))
    assert shard["layers.1.outputs"].dtype == torch.bfloat16
    reference = ActivationStore(built[1]).activations([1])(ids, attention)[1].outputs
    assert torch.equal(shard["layers.1.outputs"][:8].float(), reference.to(torch.bfloat16).float())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_shard_is_refused_by_name(built, tmp_path, damage):
    folder = copy_store(built, tmp_path)
    shard = folder / "train-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    store = ActivationStore(folder)
    with pytest.raises(StoreError, match="train-00001.safetensors") as error:
        list(store.batches("train"))
    words = {"truncate": "truncated", "flip": "corrupt", "delete": "missing"}
    assert words[damage] in str(error.value)
    assert len(list(store.batches("train", count=1))) == 1  # the shards before it still read


def test_a_shard_with_other_tensors_is_refused(built, tmp_path):
    """A shard swapped for another valid file (with a matching manifest entry) is still checked by shape."""
    folder = copy_store(built, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["rows"] += 8
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"train-00000.safetensors of the activation store .* holds"):
        next(ActivationStore(folder).batches("train"))


def test_a_recipe_the_store_does_not_match_is_refused_naming_the_keys(built, tiny_files, tmp_path):
    recipe = built[0]
    store = ActivationStore(built[1])
    store.check(recipe)
    shorter = store_recipe(tiny_files, tmp_path, path=str(built[1]))
    store.check(shorter)
    cases = {
        "data.context_length": {"data": {"context_length": 16}},
        "data.batch_size": {"data": {"batch_size": 4}},
        "lorsa.layers [2]": {"lorsa": {"layers": [2]}},
        "training.total_tokens / max_steps needs 20 train batches": {"training": {"max_steps": 20}},
        "store.dtype": {"store": {"dtype": "bfloat16"}},
        "init.calibration_sequences": {"init": {"match_norm": True, "calibration_sequences": 4}},
    }
    for key, sections in cases.items():
        values = tiny_recipe_dict(tiny_files, tmp_path, training={"max_steps": 12, "eval_sequences": 16})
        for section, overrides in sections.items():
            values.setdefault(section, {}).update(overrides)
        values.setdefault("store", {})["path"] = str(built[1])
        with pytest.raises(StoreError, match="does not match the recipe") as error:
            LorsaTrainer(recipe_from_dict(values))
        assert key in str(error.value)


def test_rows_not_in_the_store_are_refused(built):
    source = ActivationStore(built[1]).activations([0])
    with pytest.raises(StoreError, match="not in the activation store"):
        source(torch.zeros(2, 32, dtype=torch.long), torch.ones(2, 32, dtype=torch.long))


def test_a_store_that_will_not_fit_is_refused_before_it_starts(built, tiny_files, tmp_path, monkeypatch):
    recipe = store_recipe(tiny_files, tmp_path)
    needed = sum(planned_bytes(recipe, 32).values())
    assert needed == (8 + 16 + 12 * 8) * 32 * (2 * 8 + 2 * 2 * 32 * 4)
    check_disk(tmp_path / "store", needed)
    with pytest.raises(StoreError, match=r"needs .* GiB .* free: store fewer tokens"):
        check_disk(tmp_path / "store", shutil.disk_usage(tmp_path).free)
    free = shutil.disk_usage(tmp_path)._replace(free=needed)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    with pytest.raises(StoreError, match="GiB free"):
        build_store(recipe, progress=False)
    assert not (tmp_path / "store").exists()


def test_a_killed_build_resumes_from_its_last_shard(built, tiny_files, tmp_path):
    """A build killed after three training shards leaves a manifest listing them (it is rewritten after each
    shard), perhaps a fourth shard file it never recorded and a staging file; building again keeps the three,
    writes the rest, and gives the same store as a build that was never killed."""
    folder = copy_store(built, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    for shard in train["shards"][4:]:
        (folder / shard["file"]).unlink()
    (folder / train["shards"][3]["file"]).write_bytes(b"cut short")
    (folder / ".train-00004.safetensors.tmp.safetensors").write_bytes(b"half")
    train["shards"], train["complete"], manifest["complete"] = train["shards"][:3], False, False
    manifest["tokens"]["train"] = 3 * 8 * 32
    (folder / "manifest.json").write_text(json.dumps(manifest))
    recipe = store_recipe(tiny_files, tmp_path)
    with pytest.raises(StoreError, match="not finished"):
        ActivationStore(folder).check(recipe)
    kept = {name: (folder / name).stat().st_mtime_ns for name in ("train-00000.safetensors", "train-00002.safetensors")}
    build_store(recipe, progress=False)
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept
    assert not list(folder.glob(".*"))  # the killed build's staging file is gone
    assert json.loads((folder / "manifest.json").read_text()) == json.loads((built[1] / "manifest.json").read_text())
    for shard in built[1].glob("*.safetensors"):
        assert shard.read_bytes() == (folder / shard.name).read_bytes()
    ActivationStore(folder).check(recipe)
    with pytest.raises(StoreError, match="started for other settings"):
        build_store(store_recipe(tiny_files, tmp_path, layers=[2]), progress=False)
    build_store(store_recipe(tiny_files, tmp_path, layers=[1]), progress=False)  # a finished store of more layers


def test_training_from_the_store_equals_training_live_bit_for_bit(built, tiny_files, tmp_path):
    options = {"init": {"b_o": "mean", "match_norm": True}, "training": {"max_steps": 12, "eval_sequences": 16,
               "eval_every": 5, "aux_loss_coef": 0.5, "dead_tokens": 64}}
    live_values = tiny_recipe_dict(tiny_files, tmp_path / "live", **options)
    stored_values = tiny_recipe_dict(tiny_files, tmp_path / "stored", **options)
    stored_values["store"] = {"path": str(built[1])}
    live_trainer = LorsaTrainer(recipe_from_dict(live_values))
    stored_trainer = LorsaTrainer(recipe_from_dict(stored_values))
    assert stored_trainer.train_text is None  # the store's rows are used, the text is not read
    live, stored = live_trainer.train(), stored_trainer.train()
    assert live == stored
    a = load_file(str(tmp_path / "live" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "stored" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("live", "stored")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in log] for log in logs]
    assert strip[0] == strip[1]

"""The head activation store equals a brute-force search over the same corpus, ties included, however the corpus
is batched, split into runs or merged, and survives a save and load."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf.analysis import HeadActivationStore
from lorsa_hf.analysis.ranking import sample_keys

N_HEADS, K, T = 12, 3, 7


def corpus(n_rows: int = 20, seed: int = 0):
    """Rows of activations drawn from a few values, so that many of them tie exactly."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, 50, (n_rows, T), generator=generator)
    indices = torch.stack([torch.randperm(N_HEADS, generator=generator)[:K] for _ in range(n_rows * T)])
    choices = torch.tensor([0.0, 0.5, -0.5, 1.0, -2.0, 2.0])
    values = choices[torch.randint(0, len(choices), (n_rows * T, K), generator=generator)]
    counted = torch.ones(n_rows, T, dtype=torch.bool)
    counted[:, 0] = False
    counted[3, 4:] = False  # padding
    return token_ids, counted, values.view(n_rows, T, K), indices.view(n_rows, T, K)


def entries(counted, values, indices):
    """Every active (head, row, position, value), brute force."""
    found = []
    for row in range(values.shape[0]):
        for position in range(T):
            if not counted[row, position]:
                continue
            for slot in range(K):
                value = float(values[row, position, slot])
                if value != 0:
                    found.append((int(indices[row, position, slot]), row, position, value))
    return found


def feed(store, token_ids, counted, values, indices, rows, batch_size):
    rows = list(rows)
    for start in range(0, len(rows), batch_size):
        chunk = torch.tensor(rows[start : start + batch_size])
        store.update(token_ids[chunk], chunk, counted[chunk], values[chunk], indices[chunk])
    return store


def as_tuples(contexts):
    return [(c.row, c.position, c.activation) for c in contexts]


def test_top_contexts_equal_a_brute_force_search_with_ties():
    token_ids, counted, values, indices = corpus()
    store = HeadActivationStore.create(N_HEADS, layer=0, top_n=5)
    feed(store, token_ids, counted, values, indices, range(20), 3)
    found = entries(counted, values, indices)
    for head in range(N_HEADS):
        mine = sorted((e for e in found if e[0] == head), key=lambda e: (-abs(e[3]), e[1], e[2]))[:5]
        assert as_tuples(store.top_contexts(head)) == [(r, p, v) for _, r, p, v in mine]
        assert all(c.token_ids == token_ids[c.row].tolist() for c in store.top_contexts(head))


def test_frequency_mean_and_sample_equal_a_brute_force_count():
    token_ids, counted, values, indices = corpus()
    store = feed(HeadActivationStore.create(N_HEADS, 0, top_n=2, sample_size=4), token_ids, counted, values, indices,
                 range(20), 4)
    found = entries(counted, values, indices)
    assert store.n_tokens == int(counted.sum())
    for head in range(N_HEADS):
        mine = [e for e in found if e[0] == head]
        assert int(store.n_active[head]) == len(mine)
        assert store.frequency()[head].item() == len(mine) / int(counted.sum())
        assert store.mean_activation()[head].item() == pytest.approx(sum(e[3] for e in mine) / len(mine), abs=1e-12)
        keys = sample_keys(torch.tensor([head] * len(mine)), torch.tensor([e[1] for e in mine]),
                           torch.tensor([e[2] for e in mine])).tolist()
        sampled = sorted(zip(keys, mine, strict=True), key=lambda pair: (pair[0], pair[1][1], pair[1][2]))[:4]
        assert as_tuples(store.sampled_contexts(head)) == [(e[1], e[2], e[3]) for _, e in sampled]


def test_weak_contexts_are_sampled_activations_below_the_fraction_of_the_strongest():
    token_ids, counted, values, indices = corpus()
    store = feed(HeadActivationStore.create(N_HEADS, 0, top_n=2, sample_size=30), token_ids, counted, values, indices,
                 range(20), 5)
    for head in range(N_HEADS):
        strongest = abs(store.top_contexts(head)[0].activation)
        weak = store.weak_contexts(head, fraction=0.5)
        assert weak and all(abs(c.activation) < 0.5 * strongest for c in weak)


def test_batching_and_merging_two_runs_give_the_single_run_store(tmp_path):
    token_ids, counted, values, indices = corpus(n_rows=24, seed=1)
    single = feed(HeadActivationStore.create(N_HEADS, 0, 4, 6), token_ids, counted, values, indices, range(24), 24)
    first = feed(HeadActivationStore.create(N_HEADS, 0, 4, 6), token_ids, counted, values, indices, range(0, 24, 2), 5)
    second = feed(HeadActivationStore.create(N_HEADS, 0, 4, 6), token_ids, counted, values, indices, range(1, 24, 2), 2)
    first.save(tmp_path / "first.safetensors")
    merged = HeadActivationStore.load(tmp_path / "first.safetensors").merge(second)
    for name in ("primary", "row", "position", "value"):
        assert torch.equal(getattr(merged.top, name), getattr(single.top, name))
        assert torch.equal(getattr(merged.sample, name), getattr(single.sample, name))
    assert torch.equal(merged.n_active, single.n_active)
    assert torch.allclose(merged.activation_sum, single.activation_sum, rtol=0, atol=1e-12)
    assert merged.n_tokens == single.n_tokens
    assert merged.rows.keys() == single.rows.keys()
    assert all(torch.equal(merged.rows[r], single.rows[r]) for r in single.rows)


def test_rows_no_entry_points_at_are_not_kept():
    token_ids, counted, values, indices = corpus()
    store = feed(HeadActivationStore.create(N_HEADS, 0, top_n=1, sample_size=0), token_ids, counted, values, indices,
                 range(20), 2)
    referenced = set(store.top.row[store.top.filled()].tolist())
    assert len(store.rows) <= 2 * len(referenced) + 16 * 2  # dropped now and then while streaming
    assert set(HeadActivationStore.from_state(store.state()).rows) == referenced  # and always before a save


def test_merging_stores_that_share_rows_or_shapes_is_refused():
    token_ids, counted, values, indices = corpus()
    one = feed(HeadActivationStore.create(N_HEADS, 0, 3), token_ids, counted, values, indices, range(5), 5)
    again = feed(HeadActivationStore.create(N_HEADS, 0, 3), token_ids, counted, values, indices, range(5), 5)
    with pytest.raises(ValueError, match="same rows"):
        one.merge(again)
    with pytest.raises(ValueError, match="same layer, heads, top_n"):
        one.merge(HeadActivationStore.create(N_HEADS, 0, 4))


@pytest.mark.parametrize("top_n", [0, -3])
def test_a_top_n_that_is_not_positive_is_refused(top_n):
    with pytest.raises(ValueError, match="top_n must be a positive number"):
        HeadActivationStore.create(N_HEADS, 0, top_n=top_n)


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a lorsa_hf activation store"):
        HeadActivationStore.load(tmp_path / "other.safetensors")

"""Each detector scores high on a Lorsa head built by hand to do exactly its job and low on random heads; the
same detectors read the base model's own heads."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf import LorsaConfig, LorsaForReplacement
from lorsa_hf.analysis import DETECTORS, Unembedding, base_readings, lorsa_readings, probe_sequences, score_heads
from tests.conftest import make_base

VOCAB, POSITIONS, C = 16, 40, 5.0
CURRENT, PREVIOUS, POSITION = 0, VOCAB, 2 * VOCAB  # blocks of the hand-built residual stream
D = 2 * VOCAB + POSITIONS
G = VOCAB  # heads per QK group
GROUPS = {"previous_token": 0, "attention_sink": 1, "induction": 2, "successor": 3, "random": 4}


def residual(ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T, D]: the current token, the previous token and the position, one-hot."""
    batch_size, seq_len = ids.shape
    x = torch.zeros(batch_size, seq_len, D, dtype=torch.float64)
    x[..., CURRENT:PREVIOUS] = torch.nn.functional.one_hot(ids, VOCAB).double()
    x[:, 1:, PREVIOUS:POSITION] = torch.nn.functional.one_hot(ids[:, :-1], VOCAB).double()
    x[..., POSITION:] = torch.nn.functional.one_hot(torch.arange(seq_len), POSITIONS).double()
    return x


def hand_built_layer():
    config = LorsaConfig(
        hidden_size=D, num_hidden_layers=1, layers=[0], n_qk_heads=len(GROUPS), n_ov_heads=len(GROUPS) * G,
        d_qk_head=POSITIONS, top_k=len(GROUPS) * G, rotary_dim=0, attn_scale=1.0, base_num_attention_heads=1,
    )
    layer = LorsaForReplacement(config).double().layer(0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.zero_()
        W_U = torch.randn(4 * VOCAB, D, generator=generator, dtype=torch.float64) / D**0.5  # tokens never seen
        W_U[:VOCAB] = 0.0
        W_U[:VOCAB, CURRENT:PREVIOUS] = torch.eye(VOCAB)
        layer.W_O.copy_(torch.randn(layer.W_O.shape, generator=generator, dtype=torch.float64))
        group = GROUPS["previous_token"]  # positional Q/K: query s meets key t = s - 1
        for position in range(POSITIONS - 1):
            layer.W_Q[group, POSITION + position + 1, position] = C
            layer.W_K[group, POSITION + position, position] = C
        group = GROUPS["attention_sink"]  # every query meets the key at position 0
        layer.b_Q[group, 0] = C
        layer.W_K[group, POSITION, 0] = C
        layer.b_V[: 2 * G] = 1.0
        group = GROUPS["induction"]  # the query's token meets the key whose previous token it is
        for token in range(VOCAB):
            layer.W_Q[group, CURRENT + token, token] = C
            layer.W_K[group, PREVIOUS + token, token] = C
            layer.W_V[group * G + token, CURRENT + token] = 1.0  # head j reads token j, and writes it
            layer.W_O[group * G + token] = W_U[token]
        group = GROUPS["successor"]  # attends to itself; head j reads token j and writes token j + 1
        for position in range(POSITIONS):
            layer.W_Q[group, POSITION + position, position] = C
            layer.W_K[group, POSITION + position, position] = C
        for token in range(VOCAB - 1):
            layer.W_V[group * G + token, CURRENT + token] = 1.0
            layer.W_O[group * G + token] = W_U[token + 1]
        group = GROUPS["random"]
        for weight in (layer.W_Q, layer.W_K):
            weight[group] = torch.randn(D, POSITIONS, generator=generator, dtype=torch.float64) / D**0.5
        layer.W_V[group * G :] = torch.randn(G, D, generator=generator, dtype=torch.float64)
    return layer, Unembedding(W_U=W_U, gain=torch.ones(D, dtype=torch.float64), centred=False, eps=1e-6)


@pytest.fixture(scope="module")
def scores():
    layer, unembedding = hand_built_layer()
    probes = probe_sequences(range(1, VOCAB), bos=0, families=[list(range(1, VOCAB))], n=12, length=14)

    def readings_of(ids, mask):
        return lorsa_readings(layer, lambda i, m: (residual(i), {"attention_mask": m}), unembedding, ids, mask)

    return score_heads(readings_of, probes)


def heads(group: str) -> slice:
    return slice(GROUPS[group] * G, (GROUPS[group] + 1) * G)


@pytest.mark.parametrize("job", ["previous_token", "attention_sink"])
def test_attention_heads_built_for_a_job_score_high_on_it(scores, job):
    assert scores[job][heads(job)].min() > 0.95


def test_induction_heads_built_by_hand_score_high(scores):
    assert scores["induction"][heads("induction")][1:].min() > 0.9  # token 0 is BOS: no head reads it


def test_successor_heads_built_by_hand_score_high(scores):
    assert scores["successor"][heads("successor")][1 : VOCAB - 1].min() > 0.9


def test_random_heads_score_low_on_every_detector(scores):
    assert set(scores) == set(DETECTORS)
    for job in DETECTORS:
        assert scores[job][heads("random")].max() < 0.3, job


def test_heads_built_for_one_attention_job_score_low_on_the_others(scores):
    assert scores["attention_sink"][heads("previous_token")].max() < 0.1  # at position 1 the previous token is BOS
    assert scores["previous_token"][heads("attention_sink")].max() < 0.05
    assert scores["duplicate_token"][heads("induction")].max() < 0.05


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_the_base_models_heads_get_scores_in_the_unit_interval(arch):
    model = make_base(arch).double()
    unembedding = Unembedding.from_model(model)
    probes = probe_sequences(range(3, 90), bos=0, families=[list(range(10, 20))], n=4, length=12)
    scores = score_heads(lambda ids, mask: base_readings(model, 1, unembedding, ids, mask), probes)
    assert set(scores) == set(DETECTORS)
    for job, values in scores.items():
        assert values.shape == (model.config.num_attention_heads,), job
        assert ((values >= 0) & (values <= 1)).all(), job
    assert model.config._attn_implementation == "sdpa"  # eager only while reading

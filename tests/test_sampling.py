"""The batched sampler's filters and penalties against direct computations."""
import pytest
import torch

from ironlm.errors import RequestError
from ironlm.sampling import Sampler, SampleState, SamplingParams, SeenTokens


def sample_many(logits: torch.Tensor, params: SamplingParams, n: int = 400, output_ids=None) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    state = SampleState(params, [], output_ids or [], generator)
    return {Sampler()(logits[None], [state])[0].token_id for _ in range(n)}


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_many(logits, SamplingParams(temperature=0.0), n=3) == {1}


def test_top_k_limits_choices():
    logits = torch.zeros(10)
    logits[:3] = torch.tensor([2.0, 1.9, 1.8])
    assert sample_many(logits, SamplingParams(temperature=1.0, top_k=3)) == {0, 1, 2}


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    picked = sample_many(probs.log(), SamplingParams(temperature=1.0, top_p=0.75))
    assert picked == {0, 1}


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.6, 0.3, 0.05, 0.05])
    assert sample_many(probs.log(), SamplingParams(temperature=1.0, min_p=0.2)) == {0, 1}


def test_presence_and_frequency_penalties():
    logits = torch.tensor([1.0, 1.0, 1.0])
    row = logits.clone()
    Sampler._apply_penalties(row, SampleState(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [],
                                              [0, 0, 1], None))
    assert torch.allclose(row, torch.tensor([1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0]))


def test_logit_bias_adds_to_the_logits_and_bans_or_forces_tokens():
    logits = torch.tensor([1.0, 1.0, 1.0, 5.0])
    row = logits.clone()
    Sampler._apply_penalties(row, SampleState(SamplingParams(logit_bias={0: 2.5, 3: -1.0}), [], [], None))
    assert torch.equal(row, torch.tensor([3.5, 1.0, 1.0, 4.0]))
    assert sample_many(logits, SamplingParams(temperature=1.0, logit_bias={3: -100})) == {0, 1, 2}
    assert sample_many(logits, SamplingParams(temperature=1.0, logit_bias={1: 100})) == {1}
    assert sample_many(logits, SamplingParams(temperature=0.0, logit_bias={2: 4.5}), n=3) == {2}
    assert torch.equal(logits, torch.tensor([1.0, 1.0, 1.0, 5.0]))  # the caller's logits are not written


@pytest.mark.parametrize("bias, message", [({7: 1.0}, "token id 7 is outside the vocabulary"),
                                           ({-1: 1.0}, "token id -1"), ({2: 101.0}, "from -100 to 100"),
                                           ({2: float("nan")}, "from -100 to 100"), ({"2": 1.0}, "token id '2'"),
                                           ({i: 1.0 for i in range(2000)}, "at most")])
def test_logit_bias_is_checked(bias, message):
    with pytest.raises(RequestError, match=message) as info:
        SamplingParams(logit_bias=bias).validate(vocab_size=7 if len(bias) < 100 else 5000)
    assert info.value.param == "logit_bias"


def test_json_schema_is_checked():
    with pytest.raises(RequestError, match="must be a JSON schema"):
        SamplingParams(json_schema='{"type": "object"}').validate()
    with pytest.raises(RequestError, match="not both"):
        SamplingParams(json_schema={"type": "object"}, logits_processor=lambda ids, row: row).validate()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    Sampler._apply_repetition_penalties(logits, [SampleState(SamplingParams(repetition_penalty=2.0), [0], [1], None)])
    assert torch.equal(logits, torch.tensor([[1.0, -4.0, 2.0]]))


def test_repetition_penalties_of_a_batch_follow_each_rows_own_tokens():
    # Rows with their own penalties and seen tokens, one kept across steps as the engine keeps it (SeenTokens),
    # against the rule applied row by row from scratch.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=g) * 3
    prompts, outputs = [[1, 5, 5, 9], [2], [30, 31]], [[], [2, 7], [39]]
    penalties = [1.3, 1.0, 0.8]
    seen = SeenTokens(prompts[0])
    for step_tokens in ([5, 11], [11, 12, 1]):
        outputs[0] = outputs[0] + step_tokens
        states = [SampleState(SamplingParams(repetition_penalty=p), prompt, out, None, seen if i == 0 else None)
                  for i, (p, prompt, out) in enumerate(zip(penalties, prompts, outputs))]
        actual = logits.clone()
        Sampler._apply_repetition_penalties(actual, states)
        expected = logits.clone()
        for row, p, prompt, out in zip(expected, penalties, prompts, outputs):
            for token_id in set(prompt) | set(out):
                row[token_id] = row[token_id] / p if row[token_id] > 0 else row[token_id] * p
        assert torch.equal(actual, expected)


def test_seen_tokens_count_drafts_for_their_row_alone():
    seen = SeenTokens([1, 2])
    assert sorted(seen.ids([3, 4, 9, 9], drafts=2).tolist()) == [1, 2, 3, 4, 9]  # 9 9: drafts, counted once
    assert sorted(seen.ids([3, 4]).tolist()) == [1, 2, 3, 4]  # the drafts were not kept
    assert sorted(seen.ids([3, 4, 5, 2], drafts=1).tolist()) == [1, 2, 3, 4, 5]


def test_logits_processor_is_applied():
    def only_last(generated, logits):
        masked = torch.full_like(logits, float("-inf"))
        masked[-1] = 0.0
        return masked

    assert sample_many(torch.zeros(5), SamplingParams(temperature=1.0, logits_processor=only_last), n=20) == {4}


def assert_rows_pick_as_alone(logits: torch.Tensor, params: list[SamplingParams], seed: int) -> list[int]:
    """Row i, seeded seed + i, picks the same token in one batched step as when sampled by itself."""
    batch = [SampleState(p, [], [], torch.Generator().manual_seed(seed + i)) for i, p in enumerate(params)]
    together = [r.token_id for r in Sampler()(logits.clone(), batch)]
    alone = [Sampler()(logits[i:i + 1].clone(), [SampleState(p, [], [], torch.Generator().manual_seed(seed + i))])[0].token_id
             for i, p in enumerate(params)]
    assert together == alone
    return together


def test_batched_rows_pick_as_they_would_alone():
    # One step over a mixed batch gives every row the token it gets when sampled by itself with the
    # same seed: the batched filters must not leak between rows.
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.3, min_p=0.1),
              SamplingParams(temperature=0.9), SamplingParams(temperature=1.0, top_p=0.9, top_k=8, min_p=0.05)]
    for step in range(30):
        assert_rows_pick_as_alone(logits, params, seed=100 * step)


def test_top_p_over_a_flat_distribution_keeps_half_the_ties():
    # 1,000 equally likely tokens: the nucleus for top_p 0.5 holds 500 of them, the lower ids.
    picked = sample_many(torch.zeros(1000), SamplingParams(temperature=1.0, top_p=0.5), n=2000)
    assert 350 <= len(picked) <= 500 and max(picked) < 500


def test_low_temperature_over_a_wide_vocabulary_keeps_the_distribution():
    # At low temperature most of a 49k vocabulary falls below exp's normal range (clamped before the exp): the
    # tail is never drawn, the head keeps its softmax(logits / T) shares, and top-k still cuts within the head.
    logits = torch.full((49152,), -20.0)
    logits[[7, 300, 40000]] = torch.tensor([5.0, 4.8, 4.6])
    generator = torch.Generator().manual_seed(1)
    state = SampleState(SamplingParams(temperature=0.2), [], [], generator)
    draws = torch.tensor([Sampler()(logits[None].clone(), [state])[0].token_id for _ in range(3000)])
    assert set(draws.tolist()) <= {7, 300, 40000}
    expected = torch.softmax(torch.tensor([5.0, 4.8, 4.6]) / 0.2, dim=0)
    observed = torch.tensor([(draws == i).float().mean() for i in (7, 300, 40000)])
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)
    assert sample_many(logits, SamplingParams(temperature=0.05, top_k=2)) <= {7, 300}
    assert sample_many(logits, SamplingParams(temperature=0.05, top_k=2, top_p=0.99, min_p=0.01)) <= {7, 300}


def test_flat_peaked_and_plain_rows_pick_as_they_would_alone():
    # A flat row (its nucleus gathers every token) next to a peaked top-p row (a handful) and a plain one: each
    # gets the token it gets alone with the same seed.
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    logits[0] = 0.0
    logits[1, :4] += 9.0
    params = [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0.8, top_p=0.9, top_k=300),
              SamplingParams(temperature=1.1)]
    for step in range(20):
        assert assert_rows_pick_as_alone(logits, params, seed=10 * step)[1] < 4

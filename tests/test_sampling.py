"""The batched sampler's filters and penalties against direct computations."""
import torch

from ironlm.sampling import Sampler, SampleState, SamplingParams


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


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    row = torch.tensor([2.0, -2.0, 2.0])
    Sampler._apply_penalties(row, SampleState(SamplingParams(repetition_penalty=2.0), [0], [1], None))
    assert torch.allclose(row, torch.tensor([1.0, -4.0, 2.0]))


def test_logits_processor_is_applied():
    def only_last(generated, logits):
        masked = torch.full_like(logits, float("-inf"))
        masked[-1] = 0.0
        return masked

    assert sample_many(torch.zeros(5), SamplingParams(temperature=1.0, logits_processor=only_last), n=20) == {4}

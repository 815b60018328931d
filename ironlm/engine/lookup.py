"""Prompt lookup: draft tokens for speculative decoding, taken from the sequence's own text.

A summary quotes its document, an answer its context, code the code before it. When the last few tokens written
appeared before, the tokens that followed them then are a likely continuation now. The engine computes them with
the next token in one step, and keeps those the model would have sampled itself (model_runner.verify_drafts):
on a CPU, a step of a few rows reads the weights once, as a step of one row does, so it costs far less than as
many steps of one row. No second model is needed.
"""
MAX_NGRAM = 3  # the longest tail looked up; a longer match is the likelier continuation
MIN_NGRAM = 2  # one token alone repeats too often to predict what follows


class LookupIndex:
    """Where each short run of a sequence's tokens last occurred, kept up to date as the sequence grows."""

    def __init__(self):
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> the index just past its latest occurrence
        self.num_indexed = 0  # n-grams ending at indices below this are in `ends`

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest tail of token_ids found."""
        last = len(token_ids)
        # index the n-grams that end before the last token: the tail must not find itself
        for end in range(max(self.num_indexed, 1), last):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    self.ends[tuple(token_ids[end - n:end])] = end
        self.num_indexed = max(self.num_indexed, last)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            end = self.ends.get(tuple(token_ids[last - n:])) if last > n else None
            if end is not None:
                return token_ids[end:end + k]
        return []

import torch

from agrpo.data import decode_completions


class Ids:
    """A stand-in tokenizer: decodes ids to their numbers, so the cut point is visible."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_completions_end_at_the_first_of_any_eos_id():
    rows = torch.tensor([[5, 6, 9, 7, 1], [5, 1, 9, 9, 9], [5, 6, 7, 8, 4], [9, 1, 1, 1, 1]])
    # LLaDA-Instruct: end of turn (9 here) then end-of-text padding (1 here); both end a row
    assert decode_completions(Ids(), rows, [1, 9]) == ["5 6", "5", "5 6 7 8 4", ""]
    assert decode_completions(Ids(), rows, 1) == ["5 6 9 7", "5", "5 6 7 8 4", "9"]
    assert decode_completions(Ids(), rows, None)[2] == "5 6 7 8 4"

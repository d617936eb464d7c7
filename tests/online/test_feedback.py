"""Feedback rows -> preference pairs, rating labels, thumbs and prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from palm_rlhf.rl.feedback import PreferencePair, convert_feedback, example_from_dict, is_heldout


@dataclass
class Cand:
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Comp:
    id: str
    prompt_text: str
    candidates: list[Cand]
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 5, 6])


@dataclass
class Fb:
    id: int
    completion_id: str
    kind: str
    choice_index: int | None = None
    value: int | None = None
    preferred_index: int | None = None
    rejected_index: int | None = None


COMPS = {
    "a": Comp("a", "User: hi\nAssistant:", [Cand(0, "great day", [10]), Cand(1, "awful day", [11]),
                                            Cand(2, "a day", [12])]),
    "b": Comp("b", "User: hi\nAssistant:", [Cand(0, "lovely", [13])]),
    "c": Comp("c", "User: other\nAssistant:", [Cand(0, "bad", [14])]),
}


def convert(rows, prior=(), since_id=0):
    return convert_feedback(rows, COMPS.__getitem__, prior, heldout_fraction=0.0, since_id=since_id)


def test_explicit_preference_becomes_one_pair_with_the_right_order():
    out = convert([Fb(1, "a", "preference", preferred_index=2, rejected_index=1)])
    assert [(p.chosen, p.rejected, p.source) for p in out.pairs] == [("a day", "awful day", "preference")]
    assert out.pairs[0].chosen_token_ids == [12] and out.pairs[0].rejected_token_ids == [11]
    assert out.last_feedback_id == 1 and out.feedback_count == 1


def test_thumbs_up_and_down_on_candidates_of_one_completion_make_a_pair():
    out = convert([Fb(1, "a", "thumbs", choice_index=0, value=1), Fb(2, "a", "thumbs", choice_index=1, value=-1)])
    assert [(p.chosen, p.rejected, p.source) for p in out.pairs] == [("great day", "awful day", "thumbs")]


def test_thumbs_pair_across_completions_with_the_same_prompt_text_only():
    out = convert([Fb(1, "a", "thumbs", choice_index=1, value=-1), Fb(2, "b", "thumbs", choice_index=0, value=1),
                   Fb(3, "c", "thumbs", choice_index=0, value=-1)])
    assert [(p.chosen, p.rejected) for p in out.pairs] == [("lovely", "awful day")]


def test_same_verdicts_and_same_text_give_no_pair():
    same_verdict = convert([Fb(1, "a", "thumbs", choice_index=0, value=1),
                            Fb(2, "b", "thumbs", choice_index=0, value=1)])
    same_answer = convert([Fb(1, "a", "thumbs", choice_index=0, value=1),
                           Fb(2, "a", "thumbs", choice_index=0, value=-1)])  # two people disagree on one answer
    assert same_verdict.pairs == [] and same_answer.pairs == []
    assert len(same_verdict.thumbs) == 2 and len(same_answer.thumbs) == 2


def test_ratings_map_to_bins_zero_to_four():
    out = convert([Fb(1, "a", "rating", choice_index=0, value=5), Fb(2, "a", "rating", choice_index=1, value=1)])
    assert [(r.response, r.label) for r in out.ratings] == [("great day", 4), ("awful day", 0)]


def test_new_thumb_pairs_with_a_thumb_from_an_earlier_round():
    first = convert([Fb(1, "a", "thumbs", choice_index=1, value=-1)])
    assert first.pairs == []
    second = convert([Fb(2, "b", "thumbs", choice_index=0, value=1)], prior=first.thumbs, since_id=1)
    assert [(p.chosen, p.rejected, p.feedback_id) for p in second.pairs] == [("lovely", "awful day", 2)]
    # a prior thumb newer than the cursor is being re-read: it must not pair with itself
    again = convert([Fb(1, "a", "thumbs", choice_index=1, value=-1), Fb(2, "b", "thumbs", choice_index=0, value=1)],
                    prior=[*first.thumbs, *second.thumbs], since_id=0)
    assert [(p.chosen, p.rejected) for p in again.pairs] == [("lovely", "awful day")]


def test_unknown_completions_and_bad_indices_are_skipped_not_fatal():
    out = convert([Fb(1, "zzz", "thumbs", choice_index=0, value=1),
                   Fb(2, "a", "preference", preferred_index=0, rejected_index=9), Fb(3, "a", "rating", 0, 3)])
    assert out.skipped == 2 and len(out.ratings) == 1 and out.last_feedback_id == 3


def test_prompts_are_listed_once_and_the_split_follows_the_prompt_text():
    out = convert_feedback([Fb(1, "a", "thumbs", choice_index=0, value=1), Fb(2, "b", "thumbs", choice_index=0, value=-1),
                            Fb(3, "c", "thumbs", choice_index=0, value=1)], COMPS.__getitem__, heldout_fraction=0.5)
    assert [p.prompt_text for p in out.prompts] == ["User: hi\nAssistant:", "User: other\nAssistant:"]
    for x in (*out.prompts, *out.pairs, *out.thumbs):
        assert x.heldout == is_heldout(x.prompt_text, 0.5)
    texts = [f"User: question {i}\nAssistant:" for i in range(400)]
    share = sum(is_heldout(t, 0.25) for t in texts) / len(texts)
    assert 0.18 < share < 0.32
    assert [is_heldout(t, 0.25) for t in texts] == [is_heldout(t, 0.25) for t in texts]


def test_records_round_trip_through_json_dicts():
    out = convert([Fb(1, "a", "preference", preferred_index=0, rejected_index=1)])
    back = [example_from_dict(d) for d in out.records()]
    assert any(isinstance(x, PreferencePair) and x.chosen == "great day" for x in back)

"""Where an answer ends (palm_rlhf.stops), and its use by clean_response."""

from __future__ import annotations

import pytest

from palm_rlhf.chat import clean_response
from palm_rlhf.stops import cut_at_stops, scan_stops


def test_no_stops_keep_everything():
    s = scan_stops("hello world", [])
    assert (s.end, s.stopped, s.matched, s.safe) == (11, False, "", 11)
    assert scan_stops("", ["x"]).safe == 0
    assert cut_at_stops("abc", ["", "zz"]) == "abc"  # an empty stop string is ignored


def test_the_earliest_stop_wins_and_ties_take_the_longest():
    s = scan_stops("one END two STOP", ["STOP", "END"])
    assert (s.end, s.matched, s.stopped, s.safe) == (4, "END", True, 4)
    # overlapping stops starting at the same place: the same cut, the longer one reported
    s = scan_stops("hi\nUser: x", ["\n", "\nUser:"])
    assert (s.end, s.matched) == (2, "\nUser:")
    # overlapping stops starting at different places: the earlier one, even if shorter
    s = scan_stops("abcd", ["bcd", "ab"])
    assert (s.end, s.matched) == (0, "ab")
    assert scan_stops("xxabab", ["bab", "abab"]).end == 2


@pytest.mark.parametrize(
    ("text", "stops", "safe"),
    [
        ("hello EN", ["END"], 6),  # "EN" may become END
        ("hello E", ["END"], 6),
        ("hello ENX", ["END"], 9),  # ruled out
        ("say ab", ["abc", "bz"], 4),  # the longest tail that can start a stop ("ab", not "b")
        ("say a", ["aaa"], 4),
        ("say aa", ["aaa"], 4),
        ("tail\r", ["\r\n"], 4),
    ],
)
def test_a_possible_stop_prefix_is_held_back(text, stops, safe):
    s = scan_stops(text, stops)
    assert not s.stopped and s.end == len(text) and s.safe == safe


def test_a_stop_split_across_chunks_is_never_sent():
    """Feeding text piece by piece and sending only what is safe sends exactly the answer."""
    text, stops = "It is sunny. END of answer", ["END", "sunny!"]
    for step in (1, 2, 3, 5):
        sent, seen = "", ""
        for i in range(0, len(text), step):
            seen += text[i : i + step]
            s = scan_stops(seen, stops)
            assert seen[: s.safe].startswith(sent)
            sent = seen[: s.safe]
            if s.stopped:
                break
        assert sent == "It is sunny. " == cut_at_stops(text, stops)
        assert "E" not in sent


def test_clean_response_ends_at_a_newline_or_a_stop_string():
    assert clean_response(" fine thanks\nUser: more") == "fine thanks"
    assert clean_response(" fine thanks! bye", ["!"]) == "fine thanks"
    assert clean_response(" a\x1bb STOP c", ["STOP"]) == "ab"
    assert clean_response("no stop here ") == "no stop here"

"""The promise, end to end: ``palm-rlhf up`` on its defaults (no trigger, no settings) learns
what its users prefer from their clicks alone.

Simulated raters like answers that say *when* (a day or a time of day). The system is never
told: they only chat through the gateway and click thumbs and "this one is better". The test
measures the share of served answers they like on questions they never asked, with fixed
seeds, before and after; it needs a new policy version to be served and the share to rise
beyond chance. It fails when rounds do not start by themselves, when the reward refit is
skipped or never published (the policy then trains against the shipped reward model alone, which
ranks by topic and knows nothing of their taste: new versions are served, the share stays put),
and when the policy update goes the wrong way (the gate then rejects every candidate)."""

from __future__ import annotations

import math
import re

import pytest

from palm_rlhf.demo.taste import run_raters

from .up_process import up_on_defaults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _two_proportion_z(p1: float, n1: int, p2: float, n2: int) -> float:
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (p2 - p1) / se if se > 0 else (math.inf if p2 > p1 else 0.0)


def test_up_on_its_defaults_learns_what_hidden_raters_prefer(tmp_path):
    with up_on_defaults(tmp_path / "data") as (url, lines):
        def settled(ms) -> bool:  # a new policy version, measured while it alone was served
            return ms[-1].policy_version not in (ms[0].policy_version, "") and "+" not in ms[-1].policy_version

        def second_version(ms) -> bool:  # two published rounds: the measure is then well clear of noise
            return settled(ms) and int(ms[-1].policy_version.lstrip("v")) >= 3

        result = run_raters(url, taste="when", minutes=12, raters=4, measure_prompts=24,
                            measure_samples=2, seed=0, stop_when=second_version, say=print)
    rounds = [ln for ln in lines if re.search(r"services\.trainer\.core: round \d+:", ln)]
    print("\n".join(rounds))
    first = result.measurements[0]
    # measurements of one new policy version alone (one taken while a version was swapped in
    # reads "v0002+v0003")
    new = [m for m in result.measurements[1:] if settled([first, m])]
    assert new, "no new policy version was served; rounds:\n" + "\n".join(rounds)
    last = new[-1]
    assert result.first_new_version_after is not None
    # nothing was triggered by hand: every round the trainer ran, it started itself
    assert any("starting a round" in ln for ln in lines)
    z = _two_proportion_z(first.score, first.answers, last.score, last.answers)
    print(f"raters like {first.score:.0%} -> {last.score:.0%} of served answers (z = {z:.1f}); "
          f"first new policy after {result.first_new_version_after:.0f}s; feedback {result.feedback}")
    assert z > 2.33, (first, last)  # one-sided 1% level: far beyond the sampling noise of 48 answers each

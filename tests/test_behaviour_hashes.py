"""The stages write byte for byte what they wrote when the pins were recorded (issue 12: the
operator registry moved code without changing behaviour). Rebuild the pins only for a change
that is meant to alter output: `python tests/behaviour_pins.py --write`."""

from __future__ import annotations

import json

from behaviour_pins import PINS, compute


def test_every_pin_is_reproduced() -> None:
    want = json.loads(PINS.read_text())
    got = compute()
    assert sorted(got) == sorted(want)
    changed = sorted(k for k in want if got[k] != want[k])
    assert not changed, f"{len(changed)} of {len(want)} outputs changed: {changed[:10]}"
    assert len(want) >= 250

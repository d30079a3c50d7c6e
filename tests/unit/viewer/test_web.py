"""Page helpers of the viewer: heat levels, number formats, histogram geometry, latent ids."""

from __future__ import annotations

import pytest

from auditor.viewer.web import LEVELS, _histogram_svg, _latent_number, _num, _pct, level


@pytest.mark.parametrize(
    ("value", "top", "want"),
    [
        (0.0, 5.0, 0),
        (-1.0, 5.0, 0),
        (1.0, 0.0, 0),
        (1e-9, 5.0, 1),  # any activation is visible
        (5.0, 5.0, LEVELS),
        (2.5, 5.0, 4),
        (2.6, 5.0, 5),
        (9.0, 5.0, LEVELS),  # above the reference maximum: capped
    ],
)
def test_level(value: float, top: float, want: int) -> None:
    assert level(value, top) == want


@pytest.mark.parametrize(("value", "want"), [(0.0, "0%"), (0.00001, "<0.01%"), (0.0123, "1.23%"), (1.0, "100.00%")])
def test_pct(value: float, want: str) -> None:
    assert _pct(value) == want


@pytest.mark.parametrize(("value", "want"), [(None, "—"), (0.0, "0"), (3.14159, "3.14"), (1234.5, "1.23e+03")])
def test_num(value: float | None, want: str) -> None:
    assert _num(value) == want


def test_histogram_bars_are_log_scaled_and_fill_the_width() -> None:
    svg = _histogram_svg([(0.1, 1.0, 0), (1.0, 10.0, 9), (10.0, 100.0, 99)])
    assert svg is not None
    bars = svg["bars"]
    assert [b["h"] for b in bars] == [0.0, pytest.approx(svg["height"] / 2, abs=0.01), svg["height"]]
    assert bars[-1]["x"] + bars[-1]["w"] <= svg["width"] and (svg["lo"], svg["hi"]) == (0.1, 100.0)
    assert _histogram_svg([]) is None


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0", 0),
        ("12", 12),
        ("007", 7),
        ("\u00b2", None),  # superscript two: str.isdigit() says yes, int() says no
        ("\u0663", None),  # Arabic-Indic three: int() reads 3
        ("\uff18\uff15", None),  # fullwidth 85
        ("1_0", None),  # int() reads 10
        ("+3", None),
        ("-1", None),
        (" 3", None),
        ("", None),
        ("deception.fraud", None),
    ],
)
def test_latent_ids_are_ascii_digits(text: str, want: int | None) -> None:
    assert _latent_number(text) == want

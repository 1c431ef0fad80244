"""The benchmarks regenerate their reports in docs/ and keep what a person wrote below the marker."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import HAND_WRITTEN, write_report_keeping_notes  # noqa: E402


def test_a_regenerated_report_keeps_the_hand_written_notes_and_replaces_the_figures(tmp_path):
    report = tmp_path / "report.md"
    write_report_keeping_notes(report, ["# Figures", "", "| a | 1 |"])
    assert report.read_text() == f"# Figures\n\n| a | 1 |\n{HAND_WRITTEN}\n"

    report.write_text(report.read_text() + "\n## Reading the figures\n\n- a is one.\n")
    write_report_keeping_notes(report, ["# Figures", "", "| a | 2 |"])
    text = report.read_text()
    assert "| a | 2 |" in text and "| a | 1 |" not in text
    assert text.endswith(f"{HAND_WRITTEN}\n\n## Reading the figures\n\n- a is one.\n")
    assert text.count(HAND_WRITTEN) == 1

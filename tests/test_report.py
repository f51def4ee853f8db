"""The sweep's report (ldm/eval/report.py): image grids.  The report files of a whole sweep are tested in
test_sweep.py (test_report_files_are_readable, test_example_grid_has_one_row_per_example_and_labelled_columns), where
the sweep they need is run once."""

from __future__ import annotations

import pytest

from ldm.eval.report import image_grid


def test_image_grid_rejects_empty_input():
    with pytest.raises(ValueError):
        image_grid([], ["a"])
    with pytest.raises(ValueError):
        image_grid([[None]], ["a"])

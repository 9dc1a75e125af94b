"""Regenerating a benchmark's Markdown report keeps the hand-written notes under its marker."""

from benchmarks.common import NOTES_MARKER, write_markdown


def test_notes_under_the_marker_survive_a_regeneration(tmp_path):
    path = tmp_path / "sub" / "report.md"
    write_markdown(path, "# Report\n\nvalue 1\n")
    assert path.read_text() == "# Report\n\nvalue 1\n"
    notes = f"{NOTES_MARKER}\n\n## Reading these numbers (hand-written)\n\nvalue 1 is good.\n"
    path.write_text(path.read_text() + "\n" + notes)
    write_markdown(path, "# Report\n\nvalue 2")
    text = path.read_text()
    assert text == "# Report\n\nvalue 2\n\n" + notes  # the generated part replaced, the notes kept verbatim
    write_markdown(path, "# Report\n\nvalue 3\n")
    assert path.read_text().count(NOTES_MARKER) == 1 and path.read_text().endswith(notes)


def test_a_report_without_the_marker_is_replaced_entirely(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("# Old\n\n## Notes\n\nno marker here\n")
    write_markdown(path, "# New\n")
    assert path.read_text() == "# New\n"

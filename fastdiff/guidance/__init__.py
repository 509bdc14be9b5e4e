"""fastdiff.guidance (see DESIGN.md)."""

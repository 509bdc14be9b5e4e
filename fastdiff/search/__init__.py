"""fastdiff.search (see DESIGN.md)."""

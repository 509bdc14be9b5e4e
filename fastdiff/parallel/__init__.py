"""fastdiff.parallel (see DESIGN.md)."""

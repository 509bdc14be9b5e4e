"""fastdiff.schedulers (see DESIGN.md)."""

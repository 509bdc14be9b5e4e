"""fastdiff.models (see DESIGN.md)."""

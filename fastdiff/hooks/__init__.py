"""fastdiff.hooks (see DESIGN.md)."""

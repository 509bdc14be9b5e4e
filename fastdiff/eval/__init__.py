"""fastdiff.eval (see DESIGN.md)."""

"""Part of scrit; see DESIGN.md."""

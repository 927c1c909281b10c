"""scrit: a self-evolving critic (SCRIT) on Ray. The core package stays Ray-free so it imports fast."""

__version__ = "0.1.0"

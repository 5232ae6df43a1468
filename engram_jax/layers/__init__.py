"""Model layers, one idea per file: norms, attention, MoE, Engram."""

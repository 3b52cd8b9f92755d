"""Distillation of bidirectional teachers into causal few-step students (CausVid)."""

"""Exact evaluation: every video of a split counted once, multi-view, on any number of devices.

  runner.py           runs a pmapped eval step over a split and gathers per-video outputs
  metrics.py          the numbers, in numpy, from per-video logits (top-1/5, per class, confusion)
  reports.py          what an evaluation writes: JSON, per-video arrays, TensorBoard summaries
  checkpoint_eval.py  --mode=eval: saved checkpoints, with the temporal-order diagnostic
"""

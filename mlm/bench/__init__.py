"""Benchmark commands (`mlm bench train`, `mlm bench data`): ratios against a reference
measured in the same run. They sit above the stages and may import any of them; no stage
imports them."""

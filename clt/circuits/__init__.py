"""Attention circuits: per-head weights (`heads`), weight-based analysis (`weights`), head
detection from attention patterns (`patterns`) and virtual weights between CLT features
(`virtual`). Shapes and formulas are in each module's docstring."""

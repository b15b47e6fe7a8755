"""Batch offline inference: `modelserve predict` over folders, JSONL, Parquet or .npy (local or Ray)."""

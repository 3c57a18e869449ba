"""Batch labelling of ultrasound archives with Ray Data: decode, classify, GradCAM, Parquet."""

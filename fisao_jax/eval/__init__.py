"""Evaluation metrics: CHAIR, POPE, COCO caption metrics."""

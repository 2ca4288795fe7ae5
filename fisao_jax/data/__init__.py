"""Datasets: synthetic world, LLaVA-Instruct, COCO, image preprocessing, prompts."""

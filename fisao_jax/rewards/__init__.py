"""Fine-grained verifier: entity vocabulary, spans, CLIP scores and rewards."""

"""Input pipeline: TFDS video datasets -> sampled, decoded, augmented uint8 clip batches."""

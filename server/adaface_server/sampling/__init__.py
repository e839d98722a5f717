"""Graph sampling for metric learning: identity kNN graph -> epoch index."""

"""Machine learning: models, local training, metrics and evaluation."""

"""Sample-quality metrics: the FID Inception-v3, FID, Inception Score and precision/recall."""

"""Stage two: the DINO-Mix student, trained from a feature store."""

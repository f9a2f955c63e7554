"""Networks used by purifiers (denoisers, score models, energy models, DIP generators)."""

"""Purifiers: x in [0,1] → purified x̂ in [0,1]; one file per method, step math in steps.py."""

"""Attacks: one file each, one base class (base.py), the same call signature."""

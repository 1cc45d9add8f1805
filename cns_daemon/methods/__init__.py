"""The three methods behind one interface (see base.py). Importing this imports torch."""

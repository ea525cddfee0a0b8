"""Thin ways in: each translates its wire format to the runtime core and back."""

"""Helpers for people testing their own code against hsmsim (the pytest plugin lives here)."""

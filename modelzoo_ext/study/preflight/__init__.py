"""Preflight: every configuration checked the way it will run, before any cluster time is spent."""

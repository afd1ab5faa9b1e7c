"""Hubble bridge."""

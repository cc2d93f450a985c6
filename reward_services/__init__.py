"""Reward models for DDPO: plain functions here, Ray Serve applications around them."""

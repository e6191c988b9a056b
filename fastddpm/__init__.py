"""fastddpm: fast, faithful sampling from DDPM models (Ho, Jain, Abbeel 2020)."""

__version__ = "0.1.0"

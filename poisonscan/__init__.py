"""poisonscan: find and remove backdoor-poisoned images (PoisonCAM)."""

__version__ = "0.1.0"

"""poisonscan: find and remove backdoor-poisoned images (PoisonCAM)."""

__version__ = "0.2.0"

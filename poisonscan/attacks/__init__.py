"""Backdoor attacks for building poisoned benchmark data sets.

``patch`` (HTBA paste, Saha et al.), ``blend`` (Chen et al.) and ``ctrl`` (Li et al.) are pure functions on images;
``poison`` writes a poisoned copy of a data set with its ground truth; ``presets`` names reproducible settings.
"""

from poisonscan.attacks.blend import blend_trigger
from poisonscan.attacks.ctrl import ctrl_trigger
from poisonscan.attacks.patch import load_trigger, paste_trigger, random_corner, resize_trigger, trigger_side

__all__ = ["blend_trigger", "ctrl_trigger", "load_trigger", "paste_trigger", "random_corner", "resize_trigger",
           "trigger_side"]

"""PoisonCAM detection (Qian et al.) and the PatchSearch baseline.

Stages and modules:

1. ``features``   - threat-model features of uint8 image batches (L2-normalised), optional zero masks.
2. ``clustering`` - the fixed clustering model C(.) (faiss k-means, eq. 1) and fast nearest-centroid assignment.
3. ``masking``    - Cluster Activation Masking: cyclic masks, attention maps (eq. 2-3), best candidate window.
4. ``search``     - flip test set, poison scores, iterative cluster search and the top-k poison set.
5. ``evidence``   - null test: do the top-k windows move the flip set more than random windows do?
6. ``classifier``   - the poison classifier; ``neighbours``: its P averaged with the feature neighbours' (removal score).
7. ``verification`` - opt-in: confident flags the neighbours keep, their classifier window flip-tested.
8. ``gradcam``, ``pipeline`` - Grad-CAM baseline; the stages with resume.

See docs/method.md for the equations and the choices made where the paper is silent.
"""

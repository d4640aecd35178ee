"""PoisonCAM detection (Qian et al.) and the PatchSearch baseline, one module per step.

1. ``features``     - threat-model features of uint8 image batches (L2-normalised), optional zero masks.
2. ``clustering``   - the fixed clustering model C(.) (faiss k-means, eq. 1) and fast nearest-centroid assignment.
3. ``masking``      - Cluster Activation Masking: cyclic masks, attention maps (eq. 2-3), best candidate window;
   ``gradcam``      - the PatchSearch baseline's candidate windows.
4. ``search``       - ``SearchSettings``; flip test set, poison scores, iterative cluster search, the top-k.
5. ``evidence``     - ``EvidenceSettings``; null test: do the top-k windows move the flip set more than random ones?
   ``recurrence``   - does one picture recur among the top-k windows?
6. ``classifier``   - ``ClassifierSettings``; the poison classifier.
7. ``decision``     - ``DecisionSettings``; the removal score (``neighbours``), the opt-in ``verification`` of
   isolated flags, and ``matching``: the images that contain the recurring picture.
8. ``outputs``      - ``scores.csv`` (columns in ``scores``), ``removed.txt``, ``summary.json``, gallery, report.

``pipeline`` runs the stages (with ``context``, the state they share, and ``resume``, the run folder); ``run`` is
the Python API (``scan``, ``DetectRun``). See docs/method.md for the equations and the choices made where the paper
is silent.
"""

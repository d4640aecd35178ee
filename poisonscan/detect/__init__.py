"""PoisonCAM detection (Qian et al.) and the PatchSearch baseline, one module per step.

1. ``features``     - threat-model features of uint8 image batches (L2-normalised), optional zero masks.
2. ``clustering``   - the fixed clustering model C(.) (faiss k-means, eq. 1) and fast nearest-centroid assignment.
3. ``masking``      - Cluster Activation Masking: cyclic masks, attention maps (eq. 2-3), best candidate window;
   ``gradcam``      - the PatchSearch baseline's candidate windows.
4. ``fliptest``     - the flip test set, pasting and poison scores (``FlipTest``);
   ``search``       - ``SearchSettings``; the iterative cluster search, the top-k; the stage ``run_search``.
5. ``evidence``     - ``EvidenceSettings``; null test: do the top-k windows move the flip set more than random ones?
   ``recurrence``   - does one picture recur among the top-k windows? The stage ``run_evidence``.
6. ``classifier``   - ``ClassifierSettings``; the poison classifier (network in ``poison_net``); ``run_classifier``.
7. ``decision``     - ``DecisionSettings``; the removal score (``neighbours``), the opt-in ``verification`` of
   isolated flags and ``matching``, the images that contain the recurring picture (``run_verify``); ``decide``.
8. ``outputs``      - ``scores.csv`` (columns in ``scores``), ``removed.txt``, ``summary.json``, gallery, report.

Each stage returns a typed record (``records``); ``pipeline`` is the driver that runs them, writes and reloads the
records (``resume``: the run folder; ``seeds``: the seeded draws), and ``scan``; ``run`` reads a run folder back
(``DetectRun``). See docs/method.md for the equations and the choices made where the paper is silent.
"""

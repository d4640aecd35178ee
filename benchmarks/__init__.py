"""poisonscan's benchmarks, three kinds (run from the repository root):

- reproduction: ``benchmarks/run_pipeline.py`` (poison -> pretrain -> strength -> detect -> eval -> clean -> probe),
  ``benchmarks/decision_records.py`` (a finished scan as a record in ``benchmarks/results/decisions/``) and
  ``benchmarks/results_page.py`` (docs/results.md from the records);
- throughput: ``python benchmarks/bench.py masking|pretrain|precision|neighbours`` (``benchmarks/throughput/``);
- finished studies: ``python -m benchmarks.studies.NAME`` (``benchmarks/studies/``, its README says which question
  each answered and where the answer is written up).
"""

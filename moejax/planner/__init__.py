"""The layout planner (`scripts/plan.py`): every (dp, pp, tp, ep) layout of N devices with its
memory, work and collectives per step, and times from a cost model whose machine constants come
from files (a GPU spec, bench.py results).

  specs.py      machine constants: a datasheet spec file, the fitted fractions
  shapes.py     a phase's per-device shapes: the workload, microbatches, rows, each stage's layer kinds
  comms.py      the collectives a step or program issues, and their time on the links
  costmodel.py  per-device work of a phase (FLOPs, bytes) and its predicted time
  layouts.py    the layouts of N devices, feasibility from the rules table, one evaluated row each
  calibrate.py  bench.py JSON -> points; fitting the fractions; predicted against measured
  hlo.py        bytes each collective moves, read from compiled HLO text (for tests and checks)
  report.py     the table, JSON and the picture
"""

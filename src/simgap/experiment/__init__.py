"""The paper's experiment as cached stages: world → similarity model → embed → scan → select →
gaps → materialize → train → evaluate → analysis → report.

A config (:mod:`simgap.experiment.config`) becomes a *plan*: a list of stages, each with the part
of the config it reads and the stages it reads from. A stage's key hashes both, so every key is
known before anything runs (``--dry-run`` shows the plan and what is cached). A stage's result is
cached in ``stages/<name>.json`` under its key; a rerun skips stages whose key is unchanged, so a
killed run resumes and a changed knob redoes only what depends on it: every split has its own
select, materialize, train and evaluate stages. Scanning reads the pool twice whatever the grid:
the scan stage (every benchmark at once) and the gaps stage (every split's check at once).
"""

from simgap.experiment.plan import Plan, make_plan
from simgap.experiment.run import format_plan, run_config
from simgap.experiment.runner import Runner, Stage
from simgap.experiment.specs import Data, SplitSpec, split_specs
from simgap.experiment.steps import check_splits, scan_grid

__all__ = [
    "Data",
    "check_splits",
    "Plan",
    "Runner",
    "SplitSpec",
    "Stage",
    "format_plan",
    "make_plan",
    "run_config",
    "scan_grid",
    "split_specs",
]

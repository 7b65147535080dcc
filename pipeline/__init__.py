"""lora-pipeline: config schema, workflows, planner, runner, status."""

__version__ = "0.1.0"

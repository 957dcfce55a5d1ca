"""Task-agnostic training engine: configs, task registry, token-budget data loading,
optimizer/schedule/EMA, checkpoints, logging, and the DDP training loop."""

from .config import BackboneConfig, Config, ConfigError, DataConfig, ModelConfig, load_config, to_object, to_yaml
from .task import Evaluator, LossContext, PackPlan, Task, TaskDataset, get_task, register_task, task_names

__all__ = [
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "Evaluator",
    "LossContext",
    "ModelConfig",
    "PackPlan",
    "Task",
    "TaskDataset",
    "get_task",
    "load_config",
    "register_task",
    "task_names",
    "to_object",
    "to_yaml",
]

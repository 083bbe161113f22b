"""Typed run configuration: the schema (one dataclass per stage) and its loading and validation."""

from cse_ray.config.loading import (
    LIST_KEYS,
    PATH_KEYS,
    dump_yaml,
    from_dict,
    get_dotted,
    is_list_name,
    load_config,
    save_run_config,
    thresholds,
    to_dict,
    validate,
    with_absolute_paths,
    with_overrides,
)
from cse_ray.config.schema import (
    Config,
    CrfConfig,
    DataConfig,
    EvalConfig,
    InferConfig,
    ModelConfig,
    PipelineConfig,
    PredictConfig,
    RwConfig,
    SynthConfig,
    TrainAffConfig,
    TrainCamConfig,
    TrainCseConfig,
    TrainSegConfig,
    TuneConfig,
)

__all__ = [
    "Config", "CrfConfig", "DataConfig", "EvalConfig", "InferConfig", "LIST_KEYS", "ModelConfig",
    "PATH_KEYS", "PipelineConfig", "PredictConfig", "RwConfig", "SynthConfig", "TrainAffConfig",
    "TrainCamConfig", "TrainCseConfig", "TrainSegConfig", "TuneConfig", "dump_yaml", "from_dict",
    "get_dotted", "is_list_name", "load_config", "save_run_config", "thresholds", "to_dict", "validate",
    "with_absolute_paths", "with_overrides",
]
